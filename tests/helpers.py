"""Helpers shared by the tests that run real processes: a free loopback port, waiting for a condition, and
the recommendation service (``learn serve``) as a child process that can be killed with SIGKILL and
started again on the same port and home.

Test modules import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``, as for ``compose_local``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}  # the local server of production tests


def pg_admin():
    """An autocommit connection to the local PostgreSQL's ``postgres`` database (the test is skipped when
    the server is not reachable)."""
    import pytest

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    conn.autocommit = True
    return conn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], T], what: str, timeout_s: float = 180.0, every_s: float = 0.05) -> T:
    """Call ``pred`` until it returns something truthy (returned); fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(every_s)


class ServiceProcess:
    """``learn serve --dataset D`` as a child process on 127.0.0.1:``port`` with the given LEARN_HOME.

    ``start`` returns once ``/health`` answers (HTTP 200, ``ok`` or ``degraded``); its output goes to
    ``<home>/serve-<port>.log`` (appended across restarts), quoted when it fails. ``kill9`` is a hard
    crash (SIGKILL: no shutdown hook runs); ``stop`` is an orderly stop (SIGINT, as Ctrl-C).
    """

    def __init__(self, home: Path, dataset: str, port: int | None = None, env: Mapping[str, str] | None = None):
        self.home, self.dataset = Path(home), dataset
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {}), "LEARN_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.log_path = self.home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Start the service and wait for its first ``/health`` answer; returns that answer's body."""
        import httpx

        assert not self.alive(), "the service is running already"
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "learn_tasks.cli", "serve", "--dataset", self.dataset, "--host", "127.0.0.1",
               "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"learn serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                h = httpx.get(f"{self.url}/health", timeout=5)
                if h.status_code == 200:
                    return h.json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        self.kill9()
        raise AssertionError(f"learn serve did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the service process (nothing of it gets to run afterwards) and reap it."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            assert self.proc.returncode == -signal.SIGKILL

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Stop the service as Ctrl-C does (it flushes its served log and closes its stores); SIGKILL when it
        hangs. Returns the exit status."""
        if not self.alive():
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
        return self.proc.returncode
