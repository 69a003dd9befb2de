"""The shared state of the pipeline and the service, and the locks that give one writer at a time.

Per dataset the state is two pointers and their histories:

* the promoted model run (``pch.registry.promote`` / ``promoted``) and every promotion, for audit;
* the release the service follows (``online.releases``: model run + Milvus collection) and every release.

``state.backend`` picks where they live, behind one small interface (:class:`StateStore`):

* ``files`` (the embedded default): ``models/<dataset>/PROMOTED`` + ``promotions.jsonl`` and
  ``serve/<dataset>/release.json`` + ``releases.jsonl`` under LEARN_HOME. A history line is appended and
  synced before its pointer is replaced atomically, under an ``fcntl`` lock: safe between the processes
  of one host.
* ``postgres`` (production): the tables of :data:`SCHEMA_DDL` (created idempotently, schema version in
  ``learn_state_schema``) at ``state.url`` (``LEARN_STATE__URL``, by default the event log's URL). A
  pointer and its history row are written in one transaction, after a transaction-scoped advisory lock
  on the dataset, so concurrent writers on any host queue and each sees the other's result.

:func:`exclusive` is the lock callers take around work that must have one writer at a time. It follows
the same setting: an ``fcntl`` lock on the named file (``files``), or a PostgreSQL session advisory
lock keyed by the file's path under LEARN_HOME (``postgres``), held on a connection of its own. The
server releases a session lock when its connection ends, so a holder killed with ``kill -9`` (or a host
that vanished, noticed through TCP keepalives) frees it with no clean-up.

A home that ran on files moves to PostgreSQL with :func:`import_files`
(``python -m learn_tasks.state import --dataset NAME``), once per dataset.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from learn_tasks import postgres as pg
from learn_tasks import storage
from learn_tasks.config import Paths, Settings, load_settings

log = logging.getLogger("learn.state")

SCHEMA_VERSION = 1  # raise it with a migration in PostgresState._create when the tables change
SCHEMA_DDL = """
CREATE TABLE IF NOT EXISTS learn_state_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS learn_promotions (id BIGSERIAL PRIMARY KEY, dataset TEXT NOT NULL, run_id TEXT NOT NULL,
  reason TEXT NOT NULL, promoted_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS learn_promotions_by_dataset ON learn_promotions (dataset, id);
CREATE TABLE IF NOT EXISTS learn_promoted (dataset TEXT PRIMARY KEY, run_id TEXT NOT NULL,
  promotion_id BIGINT NOT NULL REFERENCES learn_promotions (id));
CREATE TABLE IF NOT EXISTS learn_releases (dataset TEXT NOT NULL, release_id BIGINT NOT NULL,
  model_version TEXT NOT NULL, collection TEXT NOT NULL, released_at TIMESTAMPTZ NOT NULL, record JSONB NOT NULL,
  PRIMARY KEY (dataset, release_id));
CREATE TABLE IF NOT EXISTS learn_release_current (dataset TEXT PRIMARY KEY, release_id BIGINT NOT NULL,
  FOREIGN KEY (dataset, release_id) REFERENCES learn_releases (dataset, release_id));
"""

# build(current record or None, highest release id so far) -> the new record, or None to keep the current one
ReleaseBuilder = Callable[[dict[str, Any] | None, int], dict[str, Any] | None]


class StateError(OSError):
    """The shared state cannot be read or written (database unreachable, schema too new, no URL set).

    An ``OSError``, like an unreadable pointer file: a reader that keeps going on I/O errors (the
    service's release watcher) keeps going on these too."""


class StateStore(ABC):
    """Pointers and histories of one backend; every method is safe to call from several threads."""

    backend: str

    @abstractmethod
    def promoted_run(self, dataset: str) -> str | None:
        """The promoted run id of ``dataset``, or None."""

    @abstractmethod
    def promote(self, dataset: str, run_id: str, reason: str) -> bool:
        """Point ``dataset`` at ``run_id`` and record the promotion; False (and nothing written) when it
        is already the promoted run."""

    @abstractmethod
    def promotions(self, dataset: str) -> list[dict[str, Any]]:
        """Every promotion, oldest first: ``{"run_id", "at" (UTC ISO time), "reason"}``."""

    @abstractmethod
    def release(self, dataset: str) -> dict[str, Any] | None:
        """The current release record, or None."""

    @abstractmethod
    def releases(self, dataset: str) -> list[dict[str, Any]]:
        """Every release record, oldest first."""

    @abstractmethod
    def write_release(self, dataset: str, build: ReleaseBuilder) -> tuple[dict[str, Any] | None, bool]:
        """With every other writer of ``dataset`` held off, call ``build(current, last_id)``; store the record
        it returns as the new current release and history entry (True), or keep the current one when it
        returns None (False)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend and location, without credentials."""


# ------------------------------------------------------------------------------------------ files
def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line and sync it: it is on disk before the pointer it goes with moves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=str, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """JSON lines, oldest first; a torn last line (a crash mid-append) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class FileState(StateStore):
    """The embedded backend: pointer files replaced atomically, histories appended, ``fcntl`` locks."""

    backend = "files"

    def __init__(self, paths: Paths):
        self.paths = paths

    def promoted_run(self, dataset: str) -> str | None:
        try:
            return self.paths.promoted(dataset).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def promote(self, dataset: str, run_id: str, reason: str) -> bool:
        pointer = self.paths.promoted(dataset)
        with storage.exclusive(pointer.with_name(f".{pointer.name}.lock")):
            if self.promoted_run(dataset) == run_id:
                return False
            _append_line(self.paths.promotion_history(dataset), {"run_id": run_id, "at": _utc_now(), "reason": reason})
            storage.write_text(run_id + "\n", pointer)
            return True

    def promotions(self, dataset: str) -> list[dict[str, Any]]:
        return _read_lines(self.paths.promotion_history(dataset))

    def release(self, dataset: str) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.paths.release(dataset))
        except FileNotFoundError:
            return None

    def releases(self, dataset: str) -> list[dict[str, Any]]:
        return _read_lines(self.paths.release_history(dataset))

    def write_release(self, dataset: str, build: ReleaseBuilder) -> tuple[dict[str, Any] | None, bool]:
        with storage.exclusive(self.paths.release(dataset).with_suffix(".lock")):
            now = self.release(dataset)
            ids = [int(now["release_id"])] if now else []
            ids += [int(r.get("release_id", 0)) for r in self.releases(dataset)[-1:]]
            record = build(now, max(ids, default=0))
            if record is None:
                return now, False
            # History first: a crash before the record moves leaves the previous release in force.
            _append_line(self.paths.release_history(dataset), record)
            storage.write_json(record, self.paths.release(dataset))
            return record, True

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "home": str(self.paths.home)}


# ------------------------------------------------------------------------------------------ postgres
class PostgresState(StateStore):
    """The production backend: the tables of :data:`SCHEMA_DDL`, one transaction per change."""

    backend = "postgres"

    def __init__(self, url: str, pool_size: int = 4):
        import psycopg2

        self._pg_error = psycopg2.Error
        self._pool = pg.Pool(url, pool_size, application_name="learn state", error=StateError,
                             what="the state database")
        self.where = self._pool.where
        try:
            self._create()
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _tx(self, what: str) -> Iterator[Any]:
        try:
            with self._pool.tx() as cur:
                yield cur
        except self._pg_error as exc:
            raise StateError(f"{what}: the state database at {self.where} failed: {exc}".strip()) from exc

    def _lock_dataset(self, cur: Any, what: str, dataset: str) -> None:
        """Queue the transaction behind any other one changing ``what`` of ``dataset`` (released at commit)."""
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (pg.lock_key(f"state {what} {dataset}"),))

    def _create(self) -> None:
        with self._tx("create the state tables") as cur:
            # One creator at a time: concurrent CREATE TABLE IF NOT EXISTS can collide in the catalogue.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (pg.lock_key("state schema"),))
            cur.execute(SCHEMA_DDL)
            cur.execute("SELECT version FROM learn_state_schema WHERE component = 'state'")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO learn_state_schema (component, version) VALUES ('state', %s)",
                            (SCHEMA_VERSION,))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateError(f"the state tables at {self.where} have schema version {row[0]}, newer than "
                                 f"this release of learn reads ({SCHEMA_VERSION}): upgrade learn on this host")

    def promoted_run(self, dataset: str) -> str | None:
        with self._tx(f"read the promoted run of {dataset!r}") as cur:
            cur.execute("SELECT run_id FROM learn_promoted WHERE dataset = %s", (dataset,))
            row = cur.fetchone()
        return row[0] if row else None

    def promote(self, dataset: str, run_id: str, reason: str) -> bool:
        with self._tx(f"promote {run_id!r} for {dataset!r}") as cur:
            self._lock_dataset(cur, "promoted", dataset)
            cur.execute("SELECT run_id FROM learn_promoted WHERE dataset = %s", (dataset,))
            row = cur.fetchone()
            if row is not None and row[0] == run_id:
                return False
            cur.execute("INSERT INTO learn_promotions (dataset, run_id, reason) VALUES (%s, %s, %s) RETURNING id",
                        (dataset, run_id, reason))
            promotion_id = cur.fetchone()[0]
            cur.execute("INSERT INTO learn_promoted (dataset, run_id, promotion_id) VALUES (%s, %s, %s) "
                        "ON CONFLICT (dataset) DO UPDATE SET run_id = EXCLUDED.run_id, "
                        "promotion_id = EXCLUDED.promotion_id", (dataset, run_id, promotion_id))
            return True

    def promotions(self, dataset: str) -> list[dict[str, Any]]:
        with self._tx(f"read the promotions of {dataset!r}") as cur:
            cur.execute("SELECT run_id, promoted_at, reason FROM learn_promotions WHERE dataset = %s ORDER BY id",
                        (dataset,))
            rows = cur.fetchall()
        return [{"run_id": r, "at": at.astimezone(timezone.utc).isoformat(), "reason": why} for r, at, why in rows]

    def release(self, dataset: str) -> dict[str, Any] | None:
        with self._tx(f"read the release of {dataset!r}") as cur:
            cur.execute("SELECT r.record FROM learn_release_current c JOIN learn_releases r "
                        "ON r.dataset = c.dataset AND r.release_id = c.release_id WHERE c.dataset = %s", (dataset,))
            row = cur.fetchone()
        return row[0] if row else None

    def releases(self, dataset: str) -> list[dict[str, Any]]:
        with self._tx(f"read the releases of {dataset!r}") as cur:
            cur.execute("SELECT record FROM learn_releases WHERE dataset = %s ORDER BY release_id", (dataset,))
            return [r[0] for r in cur.fetchall()]

    def write_release(self, dataset: str, build: ReleaseBuilder) -> tuple[dict[str, Any] | None, bool]:
        with self._tx(f"write a release of {dataset!r}") as cur:
            self._lock_dataset(cur, "release", dataset)
            cur.execute("SELECT r.record FROM learn_release_current c JOIN learn_releases r "
                        "ON r.dataset = c.dataset AND r.release_id = c.release_id WHERE c.dataset = %s", (dataset,))
            row = cur.fetchone()
            now = row[0] if row else None
            cur.execute("SELECT coalesce(max(release_id), 0) FROM learn_releases WHERE dataset = %s", (dataset,))
            record = build(now, int(cur.fetchone()[0]))
            if record is None:
                return now, False
            # The same text the files backend writes (values JSON cannot hold become strings).
            doc = json.dumps(record, default=str, sort_keys=True)
            cur.execute("INSERT INTO learn_releases (dataset, release_id, model_version, collection, released_at, "
                        "record) VALUES (%s, %s, %s, %s, coalesce(%s::timestamptz, clock_timestamp()), %s::jsonb)",
                        (dataset, int(record["release_id"]), str(record["model_version"]),
                         str(record["collection"]), record.get("released_at"), doc))
            cur.execute("INSERT INTO learn_release_current (dataset, release_id) VALUES (%s, %s) "
                        "ON CONFLICT (dataset) DO UPDATE SET release_id = EXCLUDED.release_id",
                        (dataset, int(record["release_id"])))
            return record, True

    def adopt(self, dataset: str, source: StateStore) -> dict[str, Any]:
        """Copy ``dataset``'s pointers and histories from ``source`` (the files under LEARN_HOME) in one
        transaction, each part only while PostgreSQL has none of it: running it again changes nothing."""
        out: dict[str, Any] = {"dataset": dataset, "promotions": 0, "promoted": None, "releases": 0,
                               "release_id": None, "kept": []}
        with self._tx(f"import the state of {dataset!r}") as cur:
            self._lock_dataset(cur, "promoted", dataset)
            self._lock_dataset(cur, "release", dataset)
            cur.execute("SELECT count(*) FROM learn_promotions WHERE dataset = %s", (dataset,))
            if cur.fetchone()[0]:
                out["kept"].append("promotions")
            else:
                history = source.promotions(dataset)
                run_id = source.promoted_run(dataset)
                if run_id and (not history or history[-1].get("run_id") != run_id):
                    history.append({"run_id": run_id, "at": None, "reason": "imported: the pointer had no history"})
                last = None
                for entry in history:
                    cur.execute("INSERT INTO learn_promotions (dataset, run_id, reason, promoted_at) VALUES "
                                "(%s, %s, %s, coalesce(%s::timestamptz, clock_timestamp())) RETURNING id",
                                (dataset, str(entry["run_id"]), str(entry.get("reason") or ""), entry.get("at")))
                    last = (str(entry["run_id"]), cur.fetchone()[0])
                if run_id and last is not None:
                    cur.execute("INSERT INTO learn_promoted (dataset, run_id, promotion_id) VALUES (%s, %s, %s)",
                                (dataset, *last))
                out.update(promotions=len(history), promoted=run_id)
            cur.execute("SELECT count(*) FROM learn_releases WHERE dataset = %s", (dataset,))
            if cur.fetchone()[0]:
                out["kept"].append("releases")
            else:
                now = source.release(dataset)
                records = {int(r["release_id"]): r for r in source.releases(dataset) if "release_id" in r}
                if now is not None:
                    records[int(now["release_id"])] = now
                for rid in sorted(records):
                    rec = records[rid]
                    cur.execute("INSERT INTO learn_releases (dataset, release_id, model_version, collection, "
                                "released_at, record) VALUES (%s, %s, %s, %s, coalesce(%s::timestamptz, "
                                "clock_timestamp()), %s::jsonb)",
                                (dataset, rid, str(rec["model_version"]), str(rec["collection"]),
                                 rec.get("released_at"), json.dumps(rec, default=str, sort_keys=True)))
                if now is not None:
                    cur.execute("INSERT INTO learn_release_current (dataset, release_id) VALUES (%s, %s)",
                                (dataset, int(now["release_id"])))
                out.update(releases=len(records), release_id=int(now["release_id"]) if now else None)
        return out

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": self.where, "schema_version": SCHEMA_VERSION}


# ------------------------------------------------------------------------------------------ choosing
_stores: dict[tuple[str, int, int], PostgresState] = {}
_stores_lock = threading.Lock()


def state_url(cfg: Settings) -> str:
    """The PostgreSQL URL of the state: ``state.url``, else the event log's."""
    url = cfg.state.url or cfg.eventlog.url
    if not url:
        raise StateError("state.backend=postgres needs LEARN_STATE__URL (or LEARN_EVENTLOG__URL, which it defaults "
                         "to), e.g. postgresql://user:password@127.0.0.1:5432/learn, in the environment")
    return url


def open_state(cfg: Settings) -> StateStore:
    """The store ``state.backend`` names. PostgreSQL stores are kept per URL and process: a process opens
    its pool (and checks the tables) once; a forked child opens its own rather than share sockets."""
    if cfg.state.backend != "postgres":
        return FileState(cfg.paths)
    key = (state_url(cfg), cfg.state.pool_size, os.getpid())
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = PostgresState(key[0], pool_size=key[1])
        return store


def close_stores() -> None:
    """Close this process's PostgreSQL stores (the next :func:`open_state` opens them again). A parent's
    stores inherited through fork are left alone: closing them would end the parent's sessions."""
    with _stores_lock:
        for key in [k for k in _stores if k[2] == os.getpid()]:
            _stores.pop(key).close()


def import_files(cfg: Settings, dataset: str) -> dict[str, Any]:
    """Upgrade to ``state.backend: postgres``: copy a dataset's promoted run, release record and their
    histories from the files under LEARN_HOME into PostgreSQL (the files stay as they were). Each part
    is copied only while PostgreSQL has none of it, so running it again, or after the pipeline has
    written there, changes nothing (``kept`` names what was already there)."""
    store = open_state(cfg)
    if not isinstance(store, PostgresState):
        raise StateError("state.backend is files: set state.backend=postgres (and LEARN_STATE__URL) to import into "
                         "PostgreSQL")
    files = FileState(cfg.paths)
    release_fields = ("release_id", "model_version", "collection")
    need = ((cfg.paths.promotion_history(dataset), files.promotions(dataset), ("run_id",)),
            (cfg.paths.release_history(dataset), files.releases(dataset), release_fields))
    for path, entries, fields in need:  # refuse bad input before anything is written
        for i, entry in enumerate(entries, start=1):
            missing = [f for f in fields if entry.get(f) in (None, "")]
            if missing:
                raise StateError(f"{path}: entry {i} has no {', '.join(missing)}; fix or remove it, then import again")
    now = files.release(dataset)
    if now is not None and any(now.get(f) in (None, "") for f in release_fields):
        raise StateError(f"{cfg.paths.release(dataset)}: needs release_id, model_version and collection")
    return store.adopt(dataset, files)


# ------------------------------------------------------------------------------------------ locks
def lock_name(cfg: Settings, path: str | Path) -> str:
    """The name of the lock a file path stands for: its path under LEARN_HOME, the same on every host
    that mounts the home, wherever it is mounted."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path(cfg.home).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


@contextmanager
def exclusive(cfg: Settings, path: str | Path, wait: bool = True) -> Iterator[bool]:
    """One holder at a time of the lock ``path`` names (``state.backend``: an ``fcntl`` lock on that file,
    or a PostgreSQL advisory lock named by its path under LEARN_HOME). Yields True once held; with
    ``wait=False`` yields False at once when another process holds it."""
    if cfg.state.backend != "postgres":
        with storage.exclusive(Path(path), wait=wait) as held:
            yield held
        return
    with advisory_lock(state_url(cfg), lock_name(cfg, path), wait=wait, poll_s=cfg.state.lock_poll_s) as held:
        yield held


@contextmanager
def advisory_lock(url: str, name: str, wait: bool = True, poll_s: float = 1.0) -> Iterator[bool]:
    """A PostgreSQL session advisory lock on a connection of its own, keyed by ``pg.lock_key(name)``.

    Waiting happens in slices of ``poll_s`` (``lock_timeout``) so that signals (a task being stopped,
    Ctrl-C) are handled between them. The lock is released on exit, and by the server whenever the
    connection ends, so a holder that dies never leaves it behind.
    """
    import psycopg2
    import psycopg2.errors

    key = pg.lock_key(name)
    conn = pg.connect(url, application_name=f"learn lock {name}", error=StateError,
                      what=f"the state database (lock {name})")
    try:
        with conn.cursor() as cur:
            if wait:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, round(poll_s * 1000))}ms",))
                while True:
                    try:
                        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
                        break
                    except psycopg2.errors.LockNotAvailable:
                        continue  # the slice ended; pending signals were handled; queue again
                held = True
            else:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                held = bool(cur.fetchone()[0])
    except BaseException as exc:
        conn.close()  # ends the session: a lock taken just before the failure goes with it
        if isinstance(exc, psycopg2.Error):
            raise StateError(f"lock {name}: the state database at {pg.redact(url)} failed: {exc}".strip()) from exc
        raise
    failed = False
    try:
        yield held
    except BaseException:
        failed = True
        raise
    finally:
        lost = None
        if held:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    if not cur.fetchone()[0]:
                        lost = "it was not held any more"
            except psycopg2.Error as exc:
                lost = f"its connection broke ({str(exc).strip()})"
        conn.close()
        if lost is not None:
            msg = (f"lock {name}: {lost}; the server released it when the session ended, possibly while the "
                   "work under it was still running")
            if failed:
                log.error(msg)
            else:
                raise StateError(msg)


def main(argv: list[str] | None = None) -> int:
    """``python -m learn_tasks.state import --dataset NAME [--dataset NAME ...]``: :func:`import_files`,
    one JSON line per dataset, with the settings of the environment (``LEARN_CONFIG``, ``LEARN_*``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="learn_tasks.state", description=main.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="copy files-backend pointers and histories into PostgreSQL")
    imp.add_argument("--dataset", action="append", required=True, help="dataset name (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_settings()
    try:
        for dataset in args.dataset:
            print(json.dumps(import_files(cfg, dataset), sort_keys=True), flush=True)
    except StateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_stores()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
