"""The two stores behind :class:`~learn_tasks.data.eventlog.EventLog`, and :func:`open_log`, which picks one.

* :class:`SqliteLog` (``eventlog.backend: sqlite``, the embedded default): one file,
  ``cfg.paths.event_log()``, in WAL mode with ``synchronous=FULL``, so a committed append is on disk before
  the caller answers and survives kill -9 of any process.
* :class:`PostgresLog` (``eventlog.backend: postgres``, production): the same tables in PostgreSQL at
  ``LEARN_EVENTLOG__URL`` (taken from the environment only), item ids from a PostgreSQL sequence.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from learn_tasks.config import Settings
from learn_tasks.data.eventlog import STREAMS, Event, EventLog, EventLogError
from learn_tasks.postgres import Pool

_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS learn_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL,
  event_id TEXT NOT NULL, user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, event_us INTEGER NOT NULL,
  logged_us INTEGER NOT NULL, UNIQUE (dataset, event_id));
CREATE INDEX IF NOT EXISTS learn_events_by_dataset ON learn_events (dataset, seq);
CREATE INDEX IF NOT EXISTS learn_events_by_time ON learn_events (dataset, logged_us);
CREATE TABLE IF NOT EXISTS learn_items (seq INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL,
  item_id INTEGER NOT NULL, source_id TEXT, title TEXT, category TEXT, brand TEXT, description TEXT,
  attributes TEXT, price REAL, logged_us INTEGER NOT NULL, UNIQUE (dataset, item_id), UNIQUE (dataset, source_id));
CREATE TABLE IF NOT EXISTS learn_served (seq INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL,
  request_id TEXT NOT NULL, logged_us INTEGER NOT NULL, user_id INTEGER NOT NULL, model_version TEXT,
  collection TEXT, strategy TEXT NOT NULL, k INTEGER, item_ids TEXT NOT NULL, cold_start TEXT NOT NULL,
  long_tail TEXT NOT NULL, latency_ms REAL);
CREATE INDEX IF NOT EXISTS learn_served_by_time ON learn_served (dataset, logged_us);
CREATE TABLE IF NOT EXISTS learn_watermarks (dataset TEXT NOT NULL, stream TEXT NOT NULL,
  position INTEGER NOT NULL, PRIMARY KEY (dataset, stream));
CREATE TABLE IF NOT EXISTS learn_landings (dataset TEXT NOT NULL, stream TEXT NOT NULL, run_key TEXT NOT NULL,
  after_seq INTEGER NOT NULL, upto_seq INTEGER NOT NULL, n_rows INTEGER NOT NULL, landed_us INTEGER NOT NULL,
  PRIMARY KEY (dataset, stream, run_key));
CREATE TABLE IF NOT EXISTS learn_sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SqliteLog(EventLog):
    """The embedded log: one SQLite file in WAL mode, ``synchronous=FULL`` (a commit is on disk), one
    connection per thread; writers queue on SQLite's write lock (``BEGIN IMMEDIATE``)."""

    backend = "sqlite"

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SQLITE_DDL)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Cursor]:
        cur = self._conn().cursor()
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def _next_item_id(self, cur: Any, floor: int) -> int:
        cur.execute("INSERT INTO learn_sequences (name, value) VALUES ('item_ids', ?) ON CONFLICT (name) DO UPDATE "
                    "SET value = max(value + 1, excluded.value) RETURNING value", (int(floor) + 1,))
        return int(cur.fetchone()[0])

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # made in another thread that is gone
                    pass
            self._all.clear()
        self._local = threading.local()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": str(self.path)}


_LOCK_CLASS = 0x4C656172  # advisory lock namespace of the log; the object id is the stream's index


def _pg_ddl() -> str:
    ddl = _SQLITE_DDL.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    ddl = ddl.replace("INTEGER", "BIGINT").replace("REAL", "DOUBLE PRECISION")
    ddl = ddl.replace("CREATE TABLE IF NOT EXISTS learn_sequences (name TEXT PRIMARY KEY, value BIGINT NOT NULL);",
                      "CREATE SEQUENCE IF NOT EXISTS learn_item_ids;")
    return ddl


class PostgresLog(EventLog):
    """The production log: the same tables in PostgreSQL, a pool of connections shared by the threads.

    Appends hold ``pg_advisory_xact_lock_shared`` for their stream, so they never wait on each other;
    :meth:`land` and :meth:`high_water` take that lock exclusively, which waits for the appends in
    flight to commit: every ``seq`` at or below the maximum they then read is final. Item ids come from
    the sequence ``learn_item_ids``.
    """

    backend = "postgres"
    ph = "%s"

    def __init__(self, url: str, pool_size: int = 8):
        import psycopg2.extras

        self._extras = psycopg2.extras
        self._pool = Pool(url, pool_size, application_name="learn event log", error=EventLogError,
                          what="the event log")
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, 99)", (_LOCK_CLASS,))  # one schema creator at a time
            cur.execute(_pg_ddl())

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Any]:
        with self._pool.tx() as cur:
            yield cur

    def _append_lock(self, cur: Any, stream: str) -> None:
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", (_LOCK_CLASS, STREAMS.index(stream)))

    def _drain_lock(self, cur: Any, stream: str) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, STREAMS.index(stream)))

    def _for_update(self) -> str:
        return " FOR UPDATE"

    def _insert_rows(self, cur: Any, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        self._extras.execute_values(cur, f"INSERT INTO {table} ({', '.join(columns)}) VALUES %s", rows,
                                    page_size=1000)

    def _insert_events(self, cur: Any, dataset: str, events: list[Event]) -> dict[str, int]:
        # One statement for the batch; the log time is the server's clock, read as each row is inserted.
        got = self._extras.execute_values(
            cur, "INSERT INTO learn_events (dataset, event_id, user_id, item_id, event_us, logged_us) VALUES %s "
                 "ON CONFLICT (dataset, event_id) DO NOTHING RETURNING event_id, seq",
            [(dataset, e.event_id, e.user_id, e.item_id, e.event_us) for e in events],
            template="(%s, %s, %s, %s, %s, (extract(epoch from clock_timestamp()) * 1000000)::bigint)",
            page_size=max(len(events), 1), fetch=True)
        return {r[0]: int(r[1]) for r in got}

    def _next_item_id(self, cur: Any, floor: int) -> int:
        cur.execute("SELECT nextval('learn_item_ids')")
        value = int(cur.fetchone()[0])
        if value <= floor:  # the catalogue has grown past the sequence: move it up
            cur.execute("SELECT setval('learn_item_ids', %s)", (int(floor) + 1,))
            value = int(floor) + 1
        return value

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": self._pool.where}


def open_log(cfg: Settings) -> EventLog:
    """The log ``eventlog.backend`` names: SQLite under LEARN_HOME, or PostgreSQL at ``LEARN_EVENTLOG__URL``."""
    if cfg.eventlog.backend == "postgres":
        if not cfg.eventlog.url:
            raise EventLogError("eventlog.backend=postgres needs LEARN_EVENTLOG__URL "
                                "(e.g. postgresql://user:password@127.0.0.1:5432/learn) in the environment")
        return PostgresLog(cfg.eventlog.url, pool_size=cfg.eventlog.pool_size)
    return SqliteLog(cfg.paths.event_log())


def status_report(cfg: Settings, dataset: str, landings: int = 10) -> dict[str, Any]:
    """``learn eventlog status``: records per stream, the landed watermarks and the last landings."""
    with open_log(cfg) as log:
        return {**log.status(dataset), "landings": log.landings(dataset)[-landings:]}
