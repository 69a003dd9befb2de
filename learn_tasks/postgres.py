"""PostgreSQL connections for the production stores (the event log, the shared state): one place for URL
handling, the thread-safe pool with its transaction scope, dedicated connections, and the 64-bit keys of
advisory locks.

Every connection is opened with TCP keepalives, so the server notices a peer that vanished (a host that
lost power, a cut network) within about a minute and ends its session: the session's advisory locks are
then released, as they are at once when a process dies and its socket closes.

psycopg2 is imported inside the functions: the embedded profile never loads it.
"""
from __future__ import annotations

import hashlib
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

# Keepalives: first probe after 30 s idle, then every 10 s, the connection dropped after 3 unanswered.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
CONNECT_TIMEOUT_S = 10


def dsn(url: str) -> str:
    """A libpq URL: SQLAlchemy-style ``postgresql+psycopg2://`` URLs work too."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def redact(url: str) -> str:
    """A connection URL without its password (for messages and ``describe``)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name`` (the same on every host and Python version,
    unlike ``hash``). One-argument keys live apart from the two-argument keys of the event log's locks."""
    return int.from_bytes(hashlib.blake2b(f"learn:{name}".encode(), digest_size=8).digest(), "big", signed=True)


def connect(url: str, application_name: str, error: type[Exception] = RuntimeError, what: str = "PostgreSQL",
            autocommit: bool = True) -> Any:
    """A dedicated connection (for a session advisory lock: the lock lives exactly as long as it).

    ``application_name`` shows in ``pg_stat_activity``, so an operator sees who holds what. A failure to
    connect raises ``error`` naming ``what`` and the URL without its password.
    """
    import psycopg2

    try:
        conn = psycopg2.connect(dsn(url), connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name[:63],
                                **KEEPALIVES)
    except psycopg2.Error as exc:
        raise error(f"cannot connect to {what} at {redact(url)}: {exc}".strip()) from exc
    conn.autocommit = autocommit
    return conn


class Pool:
    """Up to ``size`` connections shared by a process's threads; :meth:`tx` is one transaction on one of them.

    A thread waits for a free connection instead of failing. A connection that broke (server restart,
    network) is discarded rather than returned to the pool, so the next transaction opens a fresh one.
    """

    def __init__(self, url: str, size: int, application_name: str = "learn", error: type[Exception] = RuntimeError,
                 what: str = "PostgreSQL"):
        import psycopg2
        import psycopg2.pool

        self.where = redact(url)
        self.errors = (psycopg2.OperationalError, psycopg2.InterfaceError)
        try:
            self._pool = psycopg2.pool.ThreadedConnectionPool(
                1, size, dsn(url), connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name[:63],
                **KEEPALIVES)
        except psycopg2.Error as exc:
            raise error(f"cannot connect to {what} at {self.where}: {exc}".strip()) from exc
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def tx(self) -> Iterator[Any]:
        """A cursor in one transaction: committed when the block ends, rolled back when it raises."""
        with self._slots:
            conn = self._pool.getconn()
            broken = False
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException as exc:
                broken = isinstance(exc, self.errors) or bool(conn.closed)
                if not broken:
                    conn.rollback()
                raise
            finally:
                self._pool.putconn(conn, close=broken or bool(conn.closed))

    def close(self) -> None:
        self._pool.closeall()
