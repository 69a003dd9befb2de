"""Online features that follow the event log without losing an event.

The online store holds, per user, the features of the published data (written by
``features.materialize_features``) plus every event logged after the data was built (the *tail*:
events with a log ``seq`` above the landing watermark recorded with the feature tables). Two writers
keep it so, both under one :class:`OnlineLock` per dataset (a file lock on the embedded stack, a Redis
lock in production), so their read-modify-writes never interleave:

* the service (``Recommender.record_events``) takes the lock, appends the events to the log, adds them to
  the users' online rows and only then releases it;
* :func:`replay_tail` (after every rebuild, and when the service starts) takes the lock and rewrites
  each tail user's row from scratch: the user's last row of the feature tables plus the tail events in
  time order. An event the service logged is therefore either already in the row the replay reads
  back from the log, or logged after the replay and added on top of its row, never twice and never
  lost. (A crash between the log append and the online write is repaired by the next replay.)

Every online row is written with a processing-time timestamp (``features.write_stamp``), while the event
times live in the values, so stores that skip writes not newer than the stored row (Feast's Redis store)
take same-second and late events too.
"""
from __future__ import annotations

import fcntl
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import eventlog
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.online import features
from learn_tasks.storage import read_json

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger("learn.features")

USER_FEATURES = (S.RECENT_ITEM_IDS, S.RECENT_TIMESTAMPS, S.EVENT_COUNT, S.DISTINCT_ITEMS, S.FIRST_SEEN, S.LAST_SEEN)


# ==================================================================================================
# Applying events to a user's features (pure)
# ==================================================================================================
def append_event(recent_ids: list[int] | None, recent_ts: list[int] | None, item_id: int, ts: int,
                 recent: int) -> tuple[list[int], list[int]]:
    """A user's recent lists after one more event (kept in time order, trimmed to the last ``recent``)."""
    ids, times = list(recent_ids or []), list(recent_ts or [])
    pos = len(times)
    while pos > 0 and times[pos - 1] > ts:  # a late event goes where its time puts it
        pos -= 1
    ids.insert(pos, int(item_id))
    times.insert(pos, int(ts))
    return ids[-recent:], times[-recent:]


def apply_events(current: Mapping[str, Any] | None, events: Iterable[tuple[int, int]], recent: int) -> dict[str, Any]:
    """A user's features after ``events`` ((item_id, epoch seconds), in log order) on top of ``current``.

    ``distinct_items`` is exact while the history fits in L; beyond it an item that left the window and
    comes back is counted again (the rebuild from the published data restores the exact value).
    """
    cur = dict(current or {})
    ids, times = list(cur.get(S.RECENT_ITEM_IDS) or []), list(cur.get(S.RECENT_TIMESTAMPS) or [])
    count, distinct = int(cur.get(S.EVENT_COUNT) or 0), int(cur.get(S.DISTINCT_ITEMS) or 0)
    first, last = cur.get(S.FIRST_SEEN), cur.get(S.LAST_SEEN)
    for item_id, ts in events:
        distinct += int(item_id) not in ids
        ids, times = append_event(ids, times, item_id, ts, recent)
        count += 1
        first = ts if first is None else min(int(first), ts)
        last = ts if last is None else max(int(last), ts)
    return {S.RECENT_ITEM_IDS: ids, S.RECENT_TIMESTAMPS: times, S.EVENT_COUNT: count, S.DISTINCT_ITEMS: distinct,
            S.FIRST_SEEN: None if first is None else int(first), S.LAST_SEEN: None if last is None else int(last)}


# ==================================================================================================
# Writing user rows
# ==================================================================================================
def write_users(store: "FeatureStore", rows: Mapping[int, Mapping[str, Any]]) -> None:
    """Write users' full feature rows to both user views, stamped with the time of writing."""
    if not rows:
        return
    users = [int(u) for u in rows]
    stamp = features.write_stamp()
    # write_to_online_store is what store.push(<push source>) ends in; called per view directly it skips
    # the registry scan push does on every call (most of its latency).
    store.write_to_online_store(features.USER_RECENT_VIEW, pd.DataFrame({
        S.USER_ID: users, S.EVENT_TIMESTAMP: [stamp] * len(users),
        S.RECENT_ITEM_IDS: [list(rows[u][S.RECENT_ITEM_IDS]) for u in users],
        S.RECENT_TIMESTAMPS: [list(rows[u][S.RECENT_TIMESTAMPS]) for u in users]}))
    store.write_to_online_store(features.USER_ACTIVITY_VIEW, pd.DataFrame({
        S.USER_ID: users, S.EVENT_TIMESTAMP: [stamp] * len(users),
        **{c: [int(rows[u][c]) for u in users] for c in (S.EVENT_COUNT, S.DISTINCT_ITEMS, S.FIRST_SEEN, S.LAST_SEEN)}}))


def push_events(store: "FeatureStore", events: Sequence[tuple[int, int, int]], recent: int,
                current: Mapping[int, Mapping[str, Any]] | None = None,
                feature_service: Any = None) -> dict[int, dict[str, Any]]:
    """Add events ((user_id, item_id, epoch seconds), in log order) to the users' online rows: one read
    and one write per view for the whole batch. Returns the users' new features."""
    users = sorted({int(u) for u, _, _ in events})
    if current is None:
        current = features.online_user_features(store, users, feature_service=feature_service)
    by_user: dict[int, list[tuple[int, int]]] = {u: [] for u in users}
    for u, item, ts in events:
        by_user[int(u)].append((int(item), int(ts)))
    new = {u: apply_events(current.get(u), by_user[u], recent) for u in users}
    write_users(store, new)
    return new


def push_event(store: "FeatureStore", user_id: int, item_id: int, when: Any, recent: int,
               current: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record one event in the online store (read, append, write) and return the user's new features."""
    ts = int(features.epoch_seconds(pd.DatetimeIndex([S.to_utc(when)]))[0])
    cur = None if current is None else {int(user_id): current}
    return push_events(store, [(int(user_id), int(item_id), ts)], recent, current=cur)[int(user_id)]


# ==================================================================================================
# One writer at a time per dataset's online rows
# ==================================================================================================
def lock_path(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.locks() / f"online-{dataset}.lock"


class OnlineLock:
    """Serialises read-modify-writes of a dataset's online user rows across threads and processes.

    Embedded (SQLite online store): an ``fcntl`` lock on ``$LEARN_HOME/locks/online-<dataset>.lock``.
    Production (Redis online store): a Redis lock (``SET NX PX`` with a token) on the same server, which
    every service replica and pipeline worker reaches; it expires after ``timeout_s`` if its holder dies.
    """

    def __init__(self, cfg: Settings, dataset: str, timeout_s: float = 60.0):
        self._threads = threading.Lock()
        self.timeout_s = timeout_s
        self._redis = None
        if cfg.features.online_store == "redis":
            import redis

            self._redis = redis.Redis(**redis_params(cfg.features.redis_url), socket_timeout=timeout_s)
            self._name = f"learn:online-lock:{features.project_name(dataset)}"
        else:
            self._path = lock_path(cfg, dataset)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._threads:
            if self._redis is not None:
                lock = self._redis.lock(self._name, timeout=self.timeout_s, blocking_timeout=self.timeout_s,
                                        thread_local=False)
                if not lock.acquire():
                    raise features.FeaturesError(f"online lock {self._name} not acquired in {self.timeout_s:.0f} s")
                try:
                    yield
                finally:
                    try:
                        lock.release()
                    except Exception as exc:  # noqa: BLE001 - it expired: the write still happened
                        log.warning("online lock %s: %s", self._name, exc)
            else:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                with open(self._path, "w") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)


def redis_params(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments from Feast's Redis connection string (``host:port[,db=0,password=..,ssl=true]``)."""
    head, *options = [p.strip() for p in connection_string.split(",") if p.strip()]
    host, _, port = head.rpartition(":") if ":" in head else (head, "", "6379")
    out: dict[str, Any] = {"host": host or "127.0.0.1", "port": int(port or 6379)}
    for opt in options:
        key, _, value = opt.partition("=")
        key = key.strip().lower()
        if key == "db":
            out["db"] = int(value)
        elif key in ("password", "username"):
            out[key] = value
        elif key == "ssl":
            out["ssl"] = value.strip().lower() in ("1", "true", "yes")
    return out


# ==================================================================================================
# The tail replay
# ==================================================================================================
def base_rows(cfg: Settings, dataset: str, users: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each user's last row of the feature tables (what the rebuild wrote online); absent users are left out."""
    data_dir = features.store_dir(cfg, dataset) / "data"
    out: dict[int, dict[str, Any]] = {}
    wanted = pa.array(np.asarray(list(users), np.int64))
    for table in ("user_recent", "user_activity"):
        path = data_dir / f"{table}.parquet"
        if not path.exists() or not len(wanted):
            continue
        t = pq.read_table(path)
        t = t.filter(pc.is_in(t.column(S.USER_ID), value_set=wanted))
        if not t.num_rows:
            continue
        df = t.to_pandas().sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
        for row in df.groupby(S.USER_ID, sort=False).tail(1).itertuples(index=False):
            rec = out.setdefault(int(getattr(row, S.USER_ID)), {})
            for col in USER_FEATURES:
                if hasattr(row, col):
                    value = getattr(row, col)
                    rec[col] = [int(v) for v in value] if col in (S.RECENT_ITEM_IDS, S.RECENT_TIMESTAMPS) else int(value)
    return out


def tables_log_upto(cfg: Settings, dataset: str, log: eventlog.EventLog) -> int:
    """The landing watermark the feature tables were built at (the current one for tables from before it
    was recorded: they were built from everything landed)."""
    path = features.store_dir(cfg, dataset) / "state.json"
    upto = (read_json(path).get("tables") or {}).get("log_upto") if path.exists() else None
    return int(upto) if upto is not None else log.watermark(dataset, eventlog.EVENTS)


def replay_tail(cfg: Settings, dataset: str, store: "FeatureStore | None" = None,
                lock: OnlineLock | None = None, log: eventlog.EventLog | None = None) -> dict[str, Any]:
    """Rewrite the online rows of every user with events logged after the feature tables were built:
    their last table row plus those events. Exact, and idempotent; returns what it did."""
    own_log = log is None
    log = log or open_log(cfg)
    try:
        store = store or features.get_store(cfg, dataset)
        lock = lock or OnlineLock(cfg, dataset)
        with lock():
            after = tables_log_upto(cfg, dataset, log)
            tail = log.read(dataset, eventlog.EVENTS, after=after, upto=log.high_water(dataset, eventlog.EVENTS))
            if not len(tail):
                return {"after": after, "events": 0, "users": 0}
            tail = tail.sort_values([S.EVENT_TIMESTAMP, "seq"], kind="stable")
            secs = features.epoch_seconds(tail[S.EVENT_TIMESTAMP])
            users = sorted(int(u) for u in tail[S.USER_ID].unique())
            base = base_rows(cfg, dataset, users)
            by_user: dict[int, list[tuple[int, int]]] = {u: [] for u in users}
            for u, item, ts in zip(tail[S.USER_ID].to_numpy(), tail[S.ITEM_ID].to_numpy(), secs):
                by_user[int(u)].append((int(item), int(ts)))
            recent = features.recent_len(cfg)
            write_users(store, {u: apply_events(base.get(u), by_user[u], recent) for u in users})
            return {"after": after, "upto": int(tail["seq"].max()), "events": int(len(tail)), "users": len(users)}
    finally:
        if own_log:
            log.close()


def refresh_features(cfg: Settings, dataset: str, **kwargs: Any) -> dict[str, Any]:
    """``features.materialize_features`` (the rebuild from the published data), then :func:`replay_tail`
    so events logged but not landed yet stay in the online rows."""
    res = features.materialize_features(cfg, dataset, **kwargs)
    res["replayed"] = replay_tail(cfg, dataset)
    return res
