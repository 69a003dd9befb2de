"""The local Milvus Lite server: one process that owns the Milvus Lite data, every other process uses its URI.

Milvus Lite lets a single process open a data directory (it holds an advisory lock). The recommendation
service and the pipeline tasks both need the item index, so when they run at the same time the data is
served by ``milvus-lite server`` (shipped with milvus-lite) on a loopback port, and every process
connects to it by URI. ``learn index server start|stop|status`` manages it; ``index.resolve_uri`` picks
it up automatically while it runs. Its state (pid, port, process start time) is kept in
``$LEARN_HOME/milvus/server.json``; the start time guards against a recycled pid.

The lock check (:func:`check_lite_lock`) and the index errors live here, below ``index``, so that the
server and the index client share them without importing each other.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from learn_tasks.config import Settings
from learn_tasks.processes import alive, pid_record, port_open, terminate
from learn_tasks.storage import read_json, write_json

HOST = "127.0.0.1"
# gRPC channel options of a client of a Milvus Lite server (this one, or the one pymilvus runs in-process for
# a ``*.db`` URI). That server keeps gRPC's default ping policy: at most one ping per 5 minutes on a
# connection without data, else it drops the connection ("too_many_pings"). pymilvus pings every 10 s, also
# while idle, so a connection idle for about 30 s would be dropped, and the next client of the same process
# (pymilvus hands it the same shared connection) would fail at once ("Fail connecting to server"). So: no
# pings while idle, and none more often than the server accepts.
LITE_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False, "grpc.keepalive_time_ms": 300_000}


class IndexStoreError(RuntimeError):
    """The index cannot be used as asked; the message says what to do."""


class IndexLockedError(IndexStoreError):
    """The Milvus Lite data directory is open in another process."""


class ServerError(RuntimeError):
    pass


def data_dir(cfg: Settings) -> Path:
    """The Milvus Lite data directory (pymilvus names it ``*.db``; it is a folder)."""
    return cfg.paths.milvus() / "milvus.db"


def state_path(cfg: Settings) -> Path:
    return cfg.paths.milvus() / "server.json"


def log_path(cfg: Settings) -> Path:
    return cfg.paths.milvus() / "server.log"


def check_lite_lock(path: str | Path) -> None:
    """Raise IndexLockedError when another process holds the Milvus Lite data directory ``path``."""
    lock = Path(path) / "LOCK"
    if not lock.exists():
        return
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLockedError(
                f"the Milvus Lite data {path} is open in another process (the service or a pipeline task). "
                f"Run `learn index server start` once so every process shares it through a URI, or stop "
                f"that process.") from None
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def status(cfg: Settings) -> dict[str, Any]:
    """``{"running": bool, "uri": ..., "pid": ..., "port": ..., "data_dir": ...}``."""
    path = state_path(cfg)
    if not path.exists():
        return {"running": False, "data_dir": str(data_dir(cfg))}
    state = read_json(path)
    running = alive(state) is not None and port_open(HOST, int(state["port"]))
    return {**state, "running": running}


def running_uri(cfg: Settings) -> str | None:
    st = status(cfg)
    return st["uri"] if st["running"] else None


def start(cfg: Settings, port: int | None = None, wait_s: float = 60.0) -> dict[str, Any]:
    """Start the server in the background (idempotent: a running server is returned as it is)."""
    st = status(cfg)
    if st["running"]:
        return {**st, "started": False}
    port = int(port or cfg.index.server_port)
    if port_open(HOST, port):
        raise ServerError(f"port {port} on {HOST} is already in use; choose another with --port "
                          f"or index.server_port")
    ddir = data_dir(cfg)
    ddir.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_lite_lock(ddir)
    except IndexLockedError as exc:
        raise ServerError(f"cannot start the Milvus Lite server: {exc}") from exc
    log = open(log_path(cfg), "ab")
    cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(ddir), "--host", HOST,
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
        if port_open(HOST, port):
            break
        time.sleep(0.2)
    else:
        # SIGINT first: the server drains requests and closes the database cleanly on KeyboardInterrupt.
        terminate(psutil.Process(proc.pid), first=signal.SIGINT)
        raise ServerError(f"milvus-lite server did not listen on port {port} within {wait_s:.0f} s "
                          f"(log: {log_path(cfg)})")
    state = {**pid_record(proc.pid), "port": port,
             "uri": f"http://{HOST}:{port}", "data_dir": str(ddir), "log": str(log_path(cfg)),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(state, state_path(cfg))
    return {**state, "running": True, "started": True}


def stop(cfg: Settings, timeout_s: float = 15.0) -> dict[str, Any]:
    """Stop the server this LEARN_HOME started (only that process, identified by pid + start time)."""
    path = state_path(cfg)
    if not path.exists():
        return {"running": False, "stopped": False}
    state = read_json(path)
    proc = alive(state)
    if proc is not None:
        # SIGINT first: the server drains requests and closes the database cleanly on KeyboardInterrupt.
        terminate(proc, first=signal.SIGINT, timeout_s=timeout_s)
    path.unlink(missing_ok=True)
    return {**state, "running": False, "stopped": proc is not None}
