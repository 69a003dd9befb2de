"""The local Milvus Lite server: one process that owns the Milvus Lite data, every other process uses its URI.

Milvus Lite lets a single process open a data directory (it holds an advisory lock). The recommendation
service and the pipeline tasks both need the item index, so when they run at the same time the data is
served by ``milvus-lite server`` (shipped with milvus-lite) on a loopback port, and every process
connects to it by URI. ``learn index server start|stop|status`` manages it; ``index.resolve_uri`` picks
it up automatically while it runs. Its state (pid, port, process start time) is kept in
``$LEARN_HOME/milvus/server.json``; the start time guards against a recycled pid.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from learn_tasks.config import Settings
from learn_tasks.storage import read_json, write_json


class ServerError(RuntimeError):
    pass


def data_dir(cfg: Settings) -> Path:
    """The Milvus Lite data directory (pymilvus names it ``*.db``; it is a folder)."""
    return cfg.paths.milvus() / "milvus.db"


def state_path(cfg: Settings) -> Path:
    return cfg.paths.milvus() / "server.json"


def log_path(cfg: Settings) -> Path:
    return cfg.paths.milvus() / "server.log"


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _process(state: dict[str, Any]) -> psutil.Process | None:
    """The server process of a state record, or None if it is gone (or the pid now names another process)."""
    try:
        proc = psutil.Process(int(state["pid"]))
        if abs(proc.create_time() - float(state["create_time"])) > 1.0 or not proc.is_running():
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, KeyError, ValueError):
        return None


def status(cfg: Settings) -> dict[str, Any]:
    """``{"running": bool, "uri": ..., "pid": ..., "port": ..., "data_dir": ...}``."""
    path = state_path(cfg)
    if not path.exists():
        return {"running": False, "data_dir": str(data_dir(cfg))}
    state = read_json(path)
    running = _process(state) is not None and _port_open(int(state["port"]))
    return {**state, "running": running}


def running_uri(cfg: Settings) -> str | None:
    st = status(cfg)
    return st["uri"] if st["running"] else None


def start(cfg: Settings, port: int | None = None, wait_s: float = 60.0) -> dict[str, Any]:
    """Start the server in the background (idempotent: a running server is returned as it is)."""
    from learn_tasks.online.index import IndexLockedError, check_lite_lock

    st = status(cfg)
    if st["running"]:
        return {**st, "started": False}
    port = int(port or cfg.index.server_port)
    if _port_open(port):
        raise ServerError(f"port {port} on 127.0.0.1 is already in use; choose another with --port "
                          f"or index.server_port")
    ddir = data_dir(cfg)
    ddir.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_lite_lock(ddir)
    except IndexLockedError as exc:
        raise ServerError(f"cannot start the Milvus Lite server: {exc}") from exc
    log = open(log_path(cfg), "ab")
    cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(ddir), "--host", "127.0.0.1",
           "--port", str(port)]
    # A new session: the server outlives the command that started it and ignores its terminal's ^C.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path(cfg).read_text(errors="replace")[-2000:]
            raise ServerError(f"milvus-lite server exited with code {proc.returncode}; log {log_path(cfg)}:\n{tail}")
        if _port_open(port):
            break
        time.sleep(0.2)
    else:
        _terminate(psutil.Process(proc.pid))
        raise ServerError(f"milvus-lite server did not listen on port {port} within {wait_s:.0f} s "
                          f"(log: {log_path(cfg)})")
    state = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port,
             "uri": f"http://127.0.0.1:{port}", "data_dir": str(ddir), "log": str(log_path(cfg)),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(state, state_path(cfg))
    return {**state, "running": True, "started": True}


def _terminate(proc: psutil.Process, timeout_s: float = 15.0) -> None:
    # SIGINT first: the server drains requests and closes the database cleanly on KeyboardInterrupt.
    for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
            proc.wait(wait)
            return
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            continue


def stop(cfg: Settings, timeout_s: float = 15.0) -> dict[str, Any]:
    """Stop the server this LEARN_HOME started (only that process, identified by pid + start time)."""
    path = state_path(cfg)
    if not path.exists():
        return {"running": False, "stopped": False}
    state = read_json(path)
    proc = _process(state)
    if proc is not None:
        _terminate(proc, timeout_s)
    path.unlink(missing_ok=True)
    return {**state, "running": False, "stopped": proc is not None}
