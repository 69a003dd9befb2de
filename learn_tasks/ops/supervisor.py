"""Supervising the local stack's processes: one JSON pid record per process under ``$LEARN_HOME/run/``
(pid, process start time, process group, command, URL, log file ``$LEARN_HOME/run/<name>.log``).

Each process starts in a session of its own, so its group holds what it spawned (Airflow's executor
workers and task processes); the start time guards against a recycled pid. Stopping a record stops
exactly that process group (SIGTERM, then SIGKILL after a grace period) and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import psutil

from learn_tasks.config import Settings
from learn_tasks.processes import alive, pid_record, process_group, running, with_descendants
from learn_tasks.storage import read_json, write_json


def run_dir(cfg: Settings) -> Path:
    return cfg.paths.stack_run().resolve()


def pid_file(cfg: Settings, name: str) -> Path:
    return run_dir(cfg) / f"{name}.json"


def log_file(cfg: Settings, name: str) -> Path:
    return run_dir(cfg) / f"{name}.log"


def members(rec: dict[str, Any]) -> list[psutil.Process]:
    """Everything a recorded process stands for: itself, its descendants and the rest of its group."""
    found: dict[int, psutil.Process] = {}
    leader = alive(rec)
    if leader is not None:
        found.update({p.pid: p for p in with_descendants(leader)})
    with contextlib.suppress(KeyError, ValueError, TypeError):
        for proc in process_group(int(rec.get("pgid") or rec["pid"]), float(rec["create_time"]) - 1.0):
            found.setdefault(proc.pid, proc)
    return list(found.values())


def private_run_dir(cfg: Settings) -> Path:
    """``run/``, readable by its owner only: logs hold secrets (Airflow prints the generated password)."""
    path = run_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def open_log(path: Path):
    """Append to a log file that only its owner can read."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def spawn(cfg: Settings, name: str, argv: Sequence[str], env: dict[str, str], url: str | None = None,
          cwd: str | Path | None = None) -> dict[str, Any]:
    """Start ``argv`` in a new session (its own process group), log to ``run/<name>.log``, write its pid file."""
    private_run_dir(cfg)
    log_path = log_file(cfg, name)
    with open_log(log_path) as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} learn up: {' '.join(argv)}\n".encode())
        out.flush()
        # A new session: the process outlives `learn up`, ignores its terminal's ^C, and its group
        # collects whatever it spawns, which is what `learn down` stops.
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd) if cwd else None, start_new_session=True)
    rec = {"name": name, **pid_record(proc.pid), "pgid": proc.pid,
           "argv": list(argv), "url": url, "log": str(log_path), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(rec, pid_file(cfg, name))
    return rec


def stop_records(recs: Sequence[dict[str, Any]], grace_s: float = 30.0) -> bool:
    """Stop recorded processes with everything they spawned: SIGTERM to each recorded process (they stop
    their own workers), then SIGTERM to whatever is left, then SIGKILL; all records at once.

    Descendants are tracked from the first look on, so task processes that left the group (Airflow puts
    each task in a group of its own) and were re-parented when their parent exited are still stopped.
    Processes that are not the recorded one (a recycled pid) or started before it are never signalled.
    Returns whether anything was running.
    """
    tracked: dict[int, psutil.Process] = {}

    def live() -> list[psutil.Process]:
        for rec in recs:
            for proc in members(rec):
                tracked.setdefault(proc.pid, proc)
        return [p for p in tracked.values() if running(p)]

    if not live():
        return False
    leaders = [p for p in (alive(r) for r in recs) if p is not None]
    for sig, targets, wait_s in ((signal.SIGTERM, leaders or None, grace_s), (signal.SIGTERM, None, 5.0),
                                 (signal.SIGKILL, None, 5.0)):
        for proc in targets if targets is not None else live():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and live():
            if sig == signal.SIGTERM and targets is leaders and not any(running(p) for p in leaders):
                break  # the recorded processes are gone but left something behind: on to the next step
            time.sleep(0.2)
        if not live():
            break
    return True


def stop_record(rec: dict[str, Any], grace_s: float = 30.0) -> bool:
    """:func:`stop_records` of one record."""
    return stop_records([rec], grace_s)


def read_record(cfg: Settings, name: str) -> dict[str, Any] | None:
    path = pid_file(cfg, name)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
