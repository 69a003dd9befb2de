"""The durable log: user events, items added online and served recommendations, written before anything
is acknowledged, read by the pipeline exactly once.

Three streams, one per table, each record numbered by a sequence (``seq``) that only grows:

``events``  one row per accepted user event (``POST /events``): event_id (unique per dataset: a second
            append of the same id is a duplicate, never a second row), user, item, event time, log time
``items``   one row per item added online (``POST /items``), saved before it is indexed; its id comes
            from the log's item-id sequence, or from the caller (``item_id``, or ``source_id`` mapped to
            the id it got the first time)
``served``  one row per recommendation response (or a sample): request id, user, model version,
            collection, strategy, item ids with cold-start / long-tail flags, latency

Landing (:meth:`EventLog.land`) is what makes the pipeline read each record exactly once: per dataset
and stream a *watermark* (the last landed ``seq``) advances in the same transaction that records the
landing of a run key, so a re-run of the same run key gets back the same range (nothing new, nothing
lost) and a later run starts after it. Reads of new records stop at a *safe high water*: a ``seq`` below
which no append can still commit (SQLite has one writer at a time; on PostgreSQL, appenders hold a
shared advisory lock and the lander takes it exclusively for a moment, so an append that drew a lower
``seq`` but commits later is never skipped).

Backends (``eventlog.backend``, :mod:`learn_tasks.data.eventlog_stores`, ``open_log``): ``sqlite``
(embedded default: one WAL file under LEARN_HOME, durable on commit, survives kill -9) and ``postgres``
(production: the same tables in PostgreSQL at ``LEARN_EVENTLOG__URL``).

A streaming engine stands in behind the same interface: ``append_*`` = a producer write with the
broker's acknowledgement (Kafka ``acks=all`` with an idempotent producer keyed by event_id; NATS
JetStream publish with ``Nats-Msg-Id`` = event_id, whose de-duplication window gives idempotence),
``seq`` = the partition offset / stream sequence, ``high_water`` = the committed end offset (Kafka's
last stable offset under ``read_committed``), and ``land`` = reading ``(watermark, high]`` and storing
the new watermark with the landing record in one transaction (the consumer offset kept beside the
landed data, not auto-committed).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S

EVENTS, ITEMS, SERVED = "events", "items", "served"
STREAMS = (EVENTS, ITEMS, SERVED)
TABLES = {EVENTS: "learn_events", ITEMS: "learn_items", SERVED: "learn_served"}
ITEM_FIELDS = (S.SOURCE_ID, S.TITLE, S.CATEGORY, S.BRAND, S.DESCRIPTION, S.ATTRIBUTES, S.PRICE)
EVENT_ID_REGEX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
LOG_FILE = "eventlog"  # the file name landed records carry in quarantine records (line = seq)


class EventLogError(RuntimeError):
    """The log cannot be opened or written, with what to do about it."""


class ItemExists(EventLogError):
    """An item id that is already taken."""

    def __init__(self, item_id: int):
        super().__init__(f"item_id {item_id} already exists")
        self.item_id = item_id


@dataclass(frozen=True)
class Event:
    """One event to append. ``event_us``: event time in epoch microseconds; ``timed``: the client gave it."""

    event_id: str
    user_id: int
    item_id: int
    event_us: int
    timed: bool = True


@dataclass(frozen=True)
class Appended:
    """What became of one appended event: stored now, already stored (duplicate), or a conflicting reuse."""

    event_id: str
    seq: int | None
    duplicate: bool
    conflict: str | None = None


@dataclass(frozen=True)
class SavedItem:
    item_id: int
    created: bool  # False: the caller's source_id was saved before, under this id
    record: dict[str, Any]


@dataclass(frozen=True)
class Landing:
    """The records of one stream a run key landed: ``(after, upto]``; ``new`` is False on a re-run."""

    stream: str
    run_key: str
    after: int
    upto: int
    rows: int
    new: bool


def new_event_id() -> str:
    return uuid.uuid4().hex


def now_us() -> int:
    return time.time_ns() // 1000


def to_us(ts: Any) -> int:
    """A timestamp (anything ``pd.Timestamp`` reads; naive = UTC) as epoch microseconds."""
    return int(S.to_utc(ts).value // 1000)


def _times(values: Any) -> pd.Series:
    return pd.to_datetime(pd.Series(values, dtype="int64"), unit="us", utc=True).astype("datetime64[us, UTC]")


# ==================================================================================================
# The interface, and the SQL both backends share
# ==================================================================================================
class EventLog(ABC):
    """Append events, items and served records; land new records exactly once; read them back."""

    backend = "?"
    ph = "?"  # the driver's placeholder

    # ---------------------------------------------------------------- backend hooks
    @abstractmethod
    def _tx(self, write: bool = True) -> Any:
        """Context manager: a cursor inside one transaction (committed on exit, rolled back on error)."""

    @abstractmethod
    def _next_item_id(self, cur: Any, floor: int) -> int: ...

    def _append_lock(self, cur: Any, stream: str) -> None:
        """Taken by every append before it draws a ``seq`` (PostgreSQL: shared advisory lock)."""

    def _drain_lock(self, cur: Any, stream: str) -> None:
        """Waits until no append of ``stream`` is in flight (PostgreSQL: the same lock, exclusively)."""

    def _for_update(self) -> str:
        return ""

    def _insert_rows(self, cur: Any, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        cur.executemany(self._q(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"),
                        rows)

    def _insert_events(self, cur: Any, dataset: str, events: list[Event]) -> dict[str, int]:
        """Insert events whose id is new; returns {event_id: seq} of those inserted."""
        got = {}
        sql = self._q("INSERT INTO learn_events (dataset, event_id, user_id, item_id, event_us, logged_us) "
                      "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dataset, event_id) DO NOTHING RETURNING seq")
        t = now_us()
        for e in events:
            cur.execute(sql, (dataset, e.event_id, e.user_id, e.item_id, e.event_us, t))
            row = cur.fetchone()
            if row is not None:
                got[e.event_id] = int(row[0])
        return got

    def close(self) -> None:
        """Release connections."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _q(self, sql: str) -> str:
        return sql if self.ph == "?" else sql.replace("?", self.ph)

    # ---------------------------------------------------------------- events
    def append_events(self, dataset: str, events: Sequence[Event]) -> list[Appended]:
        """Store new events in one transaction (durable when this returns), one result per event in order.

        An event_id stored before (or earlier in ``events``) is a duplicate and not stored again; when the
        stored event differs (another user or item, or another time the client gave) ``conflict`` says so.
        """
        unique: dict[str, Event] = {}
        for e in events:
            unique.setdefault(e.event_id, e)
        inserted: dict[str, int] = {}
        stored: dict[str, tuple[int, int, int, int]] = {}
        if unique:
            with self._tx() as cur:
                self._append_lock(cur, EVENTS)
                inserted = self._insert_events(cur, dataset, list(unique.values()))
                missing = [i for i in unique if i not in inserted]
                for lo in range(0, len(missing), 500):
                    chunk = missing[lo:lo + 500]
                    cur.execute(self._q(f"SELECT event_id, seq, user_id, item_id, event_us FROM learn_events "
                                        f"WHERE dataset = ? AND event_id IN ({', '.join('?' * len(chunk))})"),
                                (dataset, *chunk))
                    stored.update({r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in cur.fetchall()})
        for event_id, seq in inserted.items():
            e = unique[event_id]
            stored[event_id] = (seq, e.user_id, e.item_id, e.event_us)
        out, reported = [], set()
        for e in events:
            seq, user, item, when = stored[e.event_id]
            if e.event_id in inserted and e.event_id not in reported:
                out.append(Appended(e.event_id, seq, duplicate=False))
            else:
                same = (user, item) == (e.user_id, e.item_id) and (not e.timed or when == e.event_us)
                conflict = None if same else (
                    f"event_id {e.event_id} is already stored for another event (user {user}, item {item}, "
                    f"time {pd.Timestamp(when, unit='us', tz='UTC').isoformat()})")
                out.append(Appended(e.event_id, seq, duplicate=True, conflict=conflict))
            reported.add(e.event_id)
        return out

    # ---------------------------------------------------------------- served recommendations
    def append_served(self, dataset: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Store served-recommendation records: ``request_id``, ``user_id``, ``model_version``, ``collection``,
        ``strategy``, ``k``, ``items`` ([{item_id, is_cold_start, is_long_tail}]), ``latency_ms``,
        optionally ``logged_us`` (default now)."""
        if not records:
            return 0
        rows = []
        t = now_us()
        for r in records:
            items = r.get("items") or []
            rows.append((dataset, str(r["request_id"]), int(r.get("logged_us") or t), int(r[S.USER_ID]),
                         r.get("model_version"), r.get("collection"), str(r["strategy"]), int(r.get("k") or len(items)),
                         json.dumps([int(i[S.ITEM_ID]) for i in items]),
                         json.dumps([bool(i.get(S.IS_COLD_START)) for i in items]),
                         json.dumps([bool(i.get(S.IS_LONG_TAIL)) for i in items]),
                         None if r.get("latency_ms") is None else float(r["latency_ms"])))
        with self._tx() as cur:
            self._append_lock(cur, SERVED)
            self._insert_rows(cur, "learn_served", ("dataset", "request_id", "logged_us", "user_id", "model_version",
                                                    "collection", "strategy", "k", "item_ids", "cold_start",
                                                    "long_tail", "latency_ms"), rows)
        return len(rows)

    # ---------------------------------------------------------------- items added online
    def save_item(self, dataset: str, record: Mapping[str, Any], item_id: int | None = None,
                  floor: int = 0) -> SavedItem:
        """Save an item before it is indexed. Its id: ``item_id`` (``ItemExists`` when taken), the id a
        ``source_id`` got before (``created`` False), or the next id of the log's sequence above ``floor``."""
        source = record.get(S.SOURCE_ID) or None
        values = {f: record.get(f) for f in ITEM_FIELDS} | {S.SOURCE_ID: source}
        cols = ", ".join(ITEM_FIELDS)
        sql = self._q(f"INSERT INTO learn_items (dataset, item_id, {cols}, logged_us) VALUES (?, ?, "
                      f"{', '.join('?' * len(ITEM_FIELDS))}, ?) ON CONFLICT DO NOTHING RETURNING item_id")
        with self._tx() as cur:
            self._append_lock(cur, ITEMS)
            for _ in range(1000):
                if source is not None:
                    found = self._item_where(cur, dataset, S.SOURCE_ID, source)
                    if found is not None:
                        return SavedItem(int(found[S.ITEM_ID]), False, found)
                candidate = int(item_id) if item_id is not None else self._next_item_id(cur, floor)
                cur.execute(sql, (dataset, candidate, *[values[f] for f in ITEM_FIELDS], now_us()))
                if cur.fetchone() is not None:
                    return SavedItem(candidate, True, {S.ITEM_ID: candidate, **values})
                # Not inserted: the source_id was saved meanwhile (found above on the next pass), the
                # caller's id is taken, or the sequence's id is (another writer raised the floor): next one.
                if item_id is not None and (source is None or self._item_where(cur, dataset, S.SOURCE_ID, source) is None):
                    raise ItemExists(candidate)
            raise EventLogError(f"no free item id found above {floor}")

    def _item_where(self, cur: Any, dataset: str, column: str, value: Any) -> dict[str, Any] | None:
        cur.execute(self._q(f"SELECT item_id, {', '.join(ITEM_FIELDS)} FROM learn_items WHERE dataset = ? AND "
                            f"{column} = ?"), (dataset, value))
        row = cur.fetchone()
        return None if row is None else dict(zip((S.ITEM_ID, *ITEM_FIELDS), row))

    def item(self, dataset: str, item_id: int | None = None, source_id: str | None = None) -> dict[str, Any] | None:
        """A saved item by id or by source_id (None when the log has none)."""
        with self._tx(write=False) as cur:
            if source_id is not None:
                return self._item_where(cur, dataset, S.SOURCE_ID, source_id)
            return self._item_where(cur, dataset, S.ITEM_ID, int(item_id))

    def items(self, dataset: str) -> pd.DataFrame:
        """Every item saved online for ``dataset`` (canonical item columns, plus ``seq`` and ``logged_at``)."""
        return self.read(dataset, ITEMS)

    # ---------------------------------------------------------------- reading and landing
    def read(self, dataset: str, stream: str, after: int = 0, upto: int | None = None) -> pd.DataFrame:
        """Records of ``stream`` with ``after < seq <= upto``, in ``seq`` order."""
        cols, table = _COLUMNS[stream], TABLES[stream]
        sql = f"SELECT {', '.join(cols)} FROM {table} WHERE dataset = ? AND seq > ?"
        params: tuple = (dataset, int(after))
        if upto is not None:
            sql += " AND seq <= ?"
            params += (int(upto),)
        with self._tx(write=False) as cur:
            cur.execute(self._q(sql + " ORDER BY seq"), params)
            rows = cur.fetchall()
        return _frame(stream, rows)

    def read_window(self, dataset: str, stream: str, start: Any = None, end: Any = None) -> pd.DataFrame:
        """Records of ``stream`` logged in ``[start, end)`` (either open), in ``seq`` order (for monitoring)."""
        sql = f"SELECT {', '.join(_COLUMNS[stream])} FROM {TABLES[stream]} WHERE dataset = ?"
        params: tuple = (dataset,)
        if start is not None:
            sql, params = sql + " AND logged_us >= ?", params + (to_us(start),)
        if end is not None:
            sql, params = sql + " AND logged_us < ?", params + (to_us(end),)
        with self._tx(write=False) as cur:
            cur.execute(self._q(sql + " ORDER BY seq"), params)
            return _frame(stream, cur.fetchall())

    def _position(self, cur: Any, dataset: str, stream: str) -> int:
        cur.execute(self._q("SELECT position FROM learn_watermarks WHERE dataset = ? AND stream = ?"),
                    (dataset, stream))
        row = cur.fetchone()
        return int(row[0]) if row else 0

    def watermark(self, dataset: str, stream: str = EVENTS) -> int:
        """The last ``seq`` of ``stream`` landed for ``dataset`` (0: nothing yet)."""
        with self._tx(write=False) as cur:
            return self._position(cur, dataset, stream)

    def high_water(self, dataset: str, stream: str = EVENTS) -> int:
        """The highest ``seq`` below which every append of ``stream`` has committed (safe to read up to)."""
        with self._tx() as cur:
            self._drain_lock(cur, stream)
            cur.execute(self._q(f"SELECT max(seq) FROM {TABLES[stream]} WHERE dataset = ?"), (dataset,))
            return int(cur.fetchone()[0] or 0)

    def land(self, dataset: str, stream: str, run_key: str, cutoff: Any = None) -> Landing:
        """Claim the new records of ``stream`` for ``run_key``: watermark and landing record in one transaction.

        A run key that landed before gets its own range back (a re-run lands the same records). Otherwise
        the range is ``(watermark, safe high water]``, cut before the first record logged at or after
        ``cutoff`` (the interval's end: later records belong to a later interval).
        """
        if stream not in (EVENTS, ITEMS):
            raise ValueError(f"only {EVENTS} and {ITEMS} are landed, not {stream!r}")
        table = TABLES[stream]
        with self._tx() as cur:
            self._drain_lock(cur, stream)
            cur.execute(self._q("INSERT INTO learn_watermarks (dataset, stream, position) VALUES (?, ?, 0) "
                                "ON CONFLICT (dataset, stream) DO NOTHING"), (dataset, stream))
            cur.execute(self._q("SELECT position FROM learn_watermarks WHERE dataset = ? AND stream = ?"
                                + self._for_update()), (dataset, stream))
            after = int(cur.fetchone()[0])
            cur.execute(self._q("SELECT after_seq, upto_seq, n_rows FROM learn_landings WHERE dataset = ? AND "
                                "stream = ? AND run_key = ?"), (dataset, stream, run_key))
            done = cur.fetchone()
            if done is not None:
                return Landing(stream, run_key, int(done[0]), int(done[1]), int(done[2]), new=False)
            cur.execute(self._q(f"SELECT max(seq) FROM {table} WHERE dataset = ? AND seq > ?"), (dataset, after))
            upto = int(cur.fetchone()[0] or after)
            if cutoff is not None:
                cur.execute(self._q(f"SELECT min(seq) FROM {table} WHERE dataset = ? AND seq > ? AND logged_us >= ?"),
                            (dataset, after, to_us(cutoff)))
                late = cur.fetchone()[0]
                if late is not None:
                    upto = min(upto, int(late) - 1)
            cur.execute(self._q(f"SELECT count(*) FROM {table} WHERE dataset = ? AND seq > ? AND seq <= ?"),
                        (dataset, after, upto))
            rows = int(cur.fetchone()[0])
            cur.execute(self._q("INSERT INTO learn_landings (dataset, stream, run_key, after_seq, upto_seq, n_rows, "
                                "landed_us) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (dataset, stream, run_key, after, upto, rows, now_us()))
            cur.execute(self._q("UPDATE learn_watermarks SET position = ? WHERE dataset = ? AND stream = ?"),
                        (upto, dataset, stream))
        return Landing(stream, run_key, after, upto, rows, new=True)

    def landings(self, dataset: str) -> list[dict[str, Any]]:
        with self._tx(write=False) as cur:
            cur.execute(self._q("SELECT stream, run_key, after_seq, upto_seq, n_rows, landed_us FROM learn_landings "
                                "WHERE dataset = ? ORDER BY landed_us, stream"), (dataset,))
            return [{"stream": r[0], "run_key": r[1], "after": int(r[2]), "upto": int(r[3]), "rows": int(r[4]),
                     "landed_at": pd.Timestamp(int(r[5]), unit="us", tz="UTC").isoformat()} for r in cur.fetchall()]

    def status(self, dataset: str) -> dict[str, Any]:
        """Per stream: records, highest seq, landed watermark; and the backend."""
        out: dict[str, Any] = {"dataset": dataset, **self.describe()}
        with self._tx(write=False) as cur:
            for stream in STREAMS:
                cur.execute(self._q(f"SELECT count(*), max(seq) FROM {TABLES[stream]} WHERE dataset = ?"), (dataset,))
                n, hi = cur.fetchone()
                out[stream] = {"records": int(n or 0), "last_seq": int(hi or 0)}
                if stream != SERVED:
                    out[stream]["landed_upto"] = self._position(cur, dataset, stream)
                    out[stream]["not_landed"] = self._count_after(cur, stream, dataset, out[stream]["landed_upto"])
        return out

    def _count_after(self, cur: Any, stream: str, dataset: str, after: int) -> int:
        cur.execute(self._q(f"SELECT count(*) FROM {TABLES[stream]} WHERE dataset = ? AND seq > ?"), (dataset, after))
        return int(cur.fetchone()[0])


_COLUMNS = {
    EVENTS: ("seq", "event_id", "user_id", "item_id", "event_us", "logged_us"),
    ITEMS: ("seq", "item_id", *ITEM_FIELDS, "logged_us"),
    SERVED: ("seq", "request_id", "logged_us", "user_id", "model_version", "collection", "strategy", "k", "item_ids",
             "cold_start", "long_tail", "latency_ms"),
}


def _frame(stream: str, rows: list) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows, columns=list(_COLUMNS[stream]))
    df["seq"] = df["seq"].astype("int64")
    df["logged_at"] = _times(df.pop("logged_us").to_numpy(np.int64) if len(df) else [])
    if stream == EVENTS:
        df["event_id"] = df["event_id"].astype("string")
        for c in (S.USER_ID, S.ITEM_ID):
            df[c] = df[c].astype("int64")
        df[S.EVENT_TIMESTAMP] = _times(df.pop("event_us").to_numpy(np.int64) if len(df) else [])
    elif stream == ITEMS:
        df[S.ITEM_ID] = df[S.ITEM_ID].astype("int64")
        df[S.PRICE] = pd.to_numeric(df[S.PRICE], errors="coerce").astype("float64")
        for c in ITEM_FIELDS:
            if c != S.PRICE:
                df[c] = df[c].astype("string")
    else:
        df[S.USER_ID] = df[S.USER_ID].astype("int64")
        df["item_ids"] = [json.loads(v) for v in df["item_ids"]]
        df[S.IS_COLD_START] = [json.loads(v) for v in df.pop("cold_start")]
        df[S.IS_LONG_TAIL] = [json.loads(v) for v in df.pop("long_tail")]
        df["latency_ms"] = pd.to_numeric(df["latency_ms"], errors="coerce").astype("float64")
    return df


def landed_frame(stream: str, records: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Landed records as a batch file: canonical columns, plus provenance (file ``eventlog:<dataset>/<stream>``,
    line = ``seq``) that validation keeps in its quarantine records."""
    if stream == EVENTS:
        out = records[[S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP, "event_id"]].copy()
    else:
        out = records[[S.ITEM_ID, *ITEM_FIELDS]].copy()
    out["_file"] = f"{LOG_FILE}:{dataset}/{stream}"
    out["_line"] = records["seq"].astype("int64").to_numpy()
    return out.reset_index(drop=True)
