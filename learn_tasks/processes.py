"""Process and port helpers shared by every component that starts or watches a process.

A process is identified by its pid *and* its start time (a pid record), so a recycled pid is never
mistaken for the process we started, and never signalled.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from typing import Any, Mapping

import psutil


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def http_json(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we built
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def pid_record(pid: int) -> dict[str, Any]:
    """``{"pid", "create_time"}`` of a running process: what :func:`alive` recognises it by later."""
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def alive(rec: Mapping[str, Any]) -> psutil.Process | None:
    """The process of a pid record, or None when it is gone, a zombie, or the pid now names another process."""
    try:
        proc = psutil.Process(int(rec["pid"]))
        if abs(proc.create_time() - float(rec["create_time"])) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` (same pid and start time) still runs and is no zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate(proc: psutil.Process, first: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Send ``first`` (SIGTERM, or SIGINT for a clean shutdown), wait, then SIGKILL what is left."""
    for sig, wait in ((first, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
            proc.wait(wait)
            return
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            continue


def process_group(pgid: int, born: float) -> list[psutil.Process]:
    """Live members of process group ``pgid`` that started no earlier than ``born`` (epoch seconds)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.create_time() >= born and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def with_descendants(proc: psutil.Process) -> list[psutil.Process]:
    """``proc`` and every process it spawned (that is still there)."""
    found = [proc]
    with contextlib.suppress(psutil.Error):
        found += proc.children(recursive=True)
    return found
