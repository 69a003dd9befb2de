"""Feast features: build the feature tables, apply the repo, materialise a bounded window, read them back.

The Feast objects (entities, sources, feature views, feature services) live in ``feature_repo/``; this
module turns a prepared dataset into the tables those sources read and runs Feast on them. Every
dataset gets its own store directory, which is the Feast repo path of that store
(``learn_tasks.online.feast_config``)::

    $LEARN_HOME/feast/<dataset>/
        feature_store.yaml        rendered from feature_repo/ (connection strings stay ${...} placeholders)
        data/user_recent.parquet  one row per (user, event time): the last L item ids and their times
        data/user_activity.parquet  one row per (user, event time): counts and first/last seen
        data/item_stats.parquet   one row per catalogue item, as of the window end
        registry.db, online.db    embedded registry and SQLite online store (default stack)
        state.json                what was written, applied and materialised (idempotence)

Why one row per (user, event time): Feast joins point-in-time on the row timestamp, so a training
example at time t reads exactly the history before t (``training_examples``), and materialising a
window puts each user's latest state inside it into the online store.

Two ways into the online store, by offline store (``features.offline_store``):

* ``file`` (default): the tables are the Parquet files, and :func:`materialize` writes the latest row of
  each entity through Feast's online write API. Feast's file offline store (dask) hashes object columns
  row by row and takes minutes on array features of a few hundred thousand rows; Arrow reads them in a
  second. Feast's registry records no materialisation interval on this path.
* ``postgres`` (production): the tables are also synced to PostgreSQL (``offline_tables``), the sources
  are PostgreSQL sources, and :func:`materialize` runs ``FeatureStore.materialize``, so the registry
  records every interval and ``feast materialize-incremental`` continues from the last one.

Online rows written directly are stamped with the time they are written (:func:`write_stamp`), and the
feature tables record the event log's landing watermark they were built at (``state.json``:
``tables.log_upto``), from which ``learn_tasks.online.updates`` puts the events logged later back on top
of a rebuild. The Parquet files are written in both cases: the online updates and the index read them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.data import eventlog
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.data.splits import load_split
from learn_tasks.online import feature_delta, offline_tables
from learn_tasks.online.feast_config import (  # noqa: F401 - re-exported: callers reach them as features.X
    ITEM_STATS_SERVICE, ITEM_STATS_VIEW, TABLES, USER_ACTIVITY_VIEW, USER_RECENT_VIEW, FeaturesError,
    definitions_hash, get_store, load_definitions, load_state, offline_url, project_name, repo_config, state_path,
    store_dir, store_identity)
from learn_tasks.pch.catalogue import item_slices
from learn_tasks.storage import atomic_path, read_json, write_json

if TYPE_CHECKING:  # feast is heavy; imported where used
    from feast import FeatureStore

log = logging.getLogger("learn.features")


# ==================================================================================================
# Small helpers
# ==================================================================================================
def recent_len(cfg: Settings) -> int:
    """L, the number of recent items kept per user (``features.recent_items`` or ``model.max_len``)."""
    return int(cfg.features.recent_items or cfg.model.max_len)


def epoch_seconds(ts: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Timezone-aware timestamps -> int64 seconds since 1970-01-01 UTC (floor)."""
    values = pd.DatetimeIndex(ts).tz_convert("UTC").tz_localize(None).to_numpy()
    return values.astype("datetime64[s]").astype(np.int64)


_stamp_lock = threading.Lock()
_last_stamp = [0]


def write_stamp() -> pd.Timestamp:
    """The row timestamp of an online write: the time of writing, strictly increasing in this process.

    The feature *values* carry the event times (``recent_timestamps``, ``last_seen``); the online row's
    own timestamp says when it was written. Stores that keep a row only when its timestamp is newer than
    the stored one (Feast's Redis store) then take every write in the order it was made, so an event in
    the same second as the previous one, or a late one, is never dropped.
    """
    with _stamp_lock:
        us = max(time.time_ns() // 1000, _last_stamp[0] + 1)
        _last_stamp[0] = us
    return pd.Timestamp(us, unit="us", tz="UTC")


# ==================================================================================================
# Feature tables (pure: interactions in, Arrow tables out)
# ==================================================================================================
@dataclass(frozen=True)
class Window:
    """The materialisation window [start, end); item statistics are computed as of ``end``."""

    start: pd.Timestamp
    end: pd.Timestamp

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def default_window(interactions: pd.DataFrame, window_days: float = 0.0,
                   start: str | datetime | None = None, end: str | datetime | None = None) -> Window:
    """End = one second after the last event (or ``end``); start = end - window_days (0 = first event)."""
    ts = interactions[S.EVENT_TIMESTAMP]
    if len(ts) == 0 and (start is None or end is None):
        raise FeaturesError("no interactions: give --start and --end explicitly")
    w_end = S.to_utc(end) if end is not None else ts.max().floor("s") + pd.Timedelta(seconds=1)
    if start is not None:
        w_start = S.to_utc(start)
    elif window_days > 0:
        w_start = w_end - pd.Timedelta(days=window_days)
    else:
        w_start = ts.min().floor("s")
    if w_start >= w_end:
        raise FeaturesError(f"empty window: start {w_start} is not before end {w_end}")
    return Window(w_start, w_end)


def build_tables(interactions: pd.DataFrame, item_ids: np.ndarray, recent: int, window: Window,
                 tail_share: float) -> dict[str, pa.Table]:
    """The three feature tables from canonical interactions.

    * ``user_recent``: per (user, distinct event time t), the last ``recent`` item ids with time <= t,
      oldest first, and their epoch seconds; events sharing a time keep their order in the log.
    * ``user_activity``: per (user, t), events so far, distinct items so far, first and last seen.
    * ``item_stats``: per catalogue item, popularity = events in [window.start, window.end), first seen,
      cold-start (popularity 0) and long-tail flags (``catalogue.item_slices``), stamped one second
      before ``window.end`` so the materialised window contains it.
    """
    if recent < 1:
        raise ValueError(f"recent must be >= 1, got {recent}")
    df = interactions[[S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]]
    df = df.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    u = df[S.USER_ID].to_numpy(np.int64)
    it = df[S.ITEM_ID].to_numpy(np.int64)
    t = epoch_seconds(df[S.EVENT_TIMESTAMP])
    n = len(df)

    # First row of each user's block, repeated for every row of the block.
    new_user = np.r_[True, u[1:] != u[:-1]] if n else np.zeros(0, bool)
    user_first = np.flatnonzero(new_user)
    ustart = np.repeat(user_first, np.diff(np.r_[user_first, n]))
    # Last row of each (user, time) group: one feature row per group.
    ends = np.flatnonzero(np.r_[(u[1:] != u[:-1]) | (t[1:] != t[:-1]), True]) if n else np.zeros(0, np.int64)
    begin = np.maximum(ustart[ends], ends - recent + 1)
    lengths = ends - begin + 1
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    gather = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1])
    ts_col = pa.array(pd.DatetimeIndex(t[ends].astype("datetime64[s]")).tz_localize("UTC"),
                      type=pa.timestamp("us", tz="UTC"))
    user_col = pa.array(u[ends], type=pa.int64())
    user_recent = pa.table({
        S.USER_ID: user_col,
        S.EVENT_TIMESTAMP: ts_col,
        S.RECENT_ITEM_IDS: pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(it[gather], pa.int64())).cast(
            pa.list_(pa.int64())),
        S.RECENT_TIMESTAMPS: pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(t[gather], pa.int64())).cast(
            pa.list_(pa.int64())),
    })

    first_time = ~pd.DataFrame({"u": u, "i": it}).duplicated().to_numpy()
    cum_first = np.cumsum(first_time)
    before_user = np.where(ustart > 0, cum_first[np.maximum(ustart - 1, 0)], 0)
    user_activity = pa.table({
        S.USER_ID: user_col,
        S.EVENT_TIMESTAMP: ts_col,
        S.EVENT_COUNT: pa.array(ends - ustart[ends] + 1, pa.int64()),
        S.DISTINCT_ITEMS: pa.array(cum_first[ends] - before_user[ends], pa.int64()),
        S.FIRST_SEEN: pa.array(t[ustart[ends]], pa.int64()),
        S.LAST_SEEN: pa.array(t[ends], pa.int64()),
    })

    ids = np.unique(np.r_[np.asarray(item_ids, np.int64), it])
    in_window = (t >= epoch_seconds(pd.DatetimeIndex([window.start]))[0]) & (
        t < epoch_seconds(pd.DatetimeIndex([window.end]))[0])
    window_events = pd.DataFrame({S.ITEM_ID: it[in_window]})
    slices = item_slices(window_events, ids, tail_share)
    popularity = window_events[S.ITEM_ID].value_counts().reindex(ids, fill_value=0).to_numpy(np.int64)
    first_seen = pd.Series(t[in_window]).groupby(it[in_window]).min().reindex(ids, fill_value=0).to_numpy(np.int64)
    stamp = window.end - pd.Timedelta(seconds=1)
    item_stats = pa.table({
        S.ITEM_ID: pa.array(ids, pa.int64()),
        S.EVENT_TIMESTAMP: pa.array(pd.DatetimeIndex([stamp] * len(ids)), type=pa.timestamp("us", tz="UTC")),
        S.POPULARITY: pa.array(popularity, pa.int64()),
        S.FIRST_SEEN: pa.array(first_seen, pa.int64()),
        S.IS_COLD_START: pa.array(np.isin(ids, slices[S.SLICE_COLD_START]), pa.bool_()),
        S.IS_LONG_TAIL: pa.array(np.isin(ids, slices[S.SLICE_LONG_TAIL]), pa.bool_()),
    })
    return {"user_recent": user_recent, "user_activity": user_activity, "item_stats": item_stats}


def data_fingerprint(interactions: pd.DataFrame, item_ids: np.ndarray, recent: int, window: Window,
                     tail_share: float) -> str:
    """Hash of everything the feature tables depend on: same inputs -> same fingerprint -> nothing to do."""
    h = hashlib.sha256()
    for col in (S.USER_ID, S.ITEM_ID):
        h.update(interactions[col].to_numpy(np.int64).tobytes())
    h.update(epoch_seconds(interactions[S.EVENT_TIMESTAMP]).tobytes())
    h.update(np.sort(np.asarray(item_ids, np.int64)).tobytes())
    h.update(repr((recent, window.as_dict(), tail_share)).encode())
    return h.hexdigest()[:16]


# ==================================================================================================
# Build, apply, materialise
# ==================================================================================================
def write_tables(cfg: Settings, dataset: str, tables: dict[str, pa.Table]) -> dict[str, int]:
    folder = store_dir(cfg, dataset) / "data"
    rows = {}
    for name, table in tables.items():
        with atomic_path(folder / f"{name}.parquet", ".parquet") as tmp:
            pq.write_table(table, tmp)
        rows[name] = table.num_rows
    return rows


def read_tables(cfg: Settings, dataset: str) -> dict[str, pa.Table]:
    data_dir = store_dir(cfg, dataset) / "data"
    return {t: pq.read_table(data_dir / f"{t}.parquet") for t in TABLES.values()}


def sync_offline(cfg: Settings, dataset: str, fingerprint: str, tables: dict[str, pa.Table] | None = None,
                 force: bool = False, base: tuple[str, dict[str, pa.Table]] | None = None
                 ) -> dict[str, dict[str, int]] | None:
    """With the PostgreSQL offline store, make its tables hold the feature tables of ``fingerprint``.

    ``tables`` defaults to the Parquet files; ``base`` (fingerprint and tables of the previous build) lets
    an increment send only what it changed (``offline_tables.sync_tables``). Returns the per-table counts
    of the sync, ``{}`` when the tables already held that data (nothing written), None with the file
    offline store. ``force`` sends every row.
    """
    if cfg.features.offline_store != "postgres":
        return None
    url, schema = offline_url(cfg), project_name(dataset)
    if not force and offline_tables.synced_fingerprint(url, schema) == fingerprint:
        return {}
    return offline_tables.sync_tables(url, schema, tables if tables is not None else read_tables(cfg, dataset),
                                      fingerprint, base=None if force else base)


def apply(cfg: Settings, dataset: str, store: "FeatureStore | None" = None, force: bool = False) -> bool:
    """Register the feature_repo/ objects in the dataset's registry; True when something was applied.

    Skipped when the same definitions were already applied to the same stores and the registry still
    holds them, so re-running changes nothing.
    """
    store = store or get_store(cfg, dataset)
    state = load_state(cfg, dataset)
    defs = load_definitions(offline_store=cfg.features.offline_store, cfg=cfg)
    key = {"definitions": definitions_hash(), "stores": store_identity(cfg, dataset)}
    if not force and state.get("applied") == key:
        try:
            registered = {fv.name for fv in store.list_feature_views()}
            if {fv.name for fv in defs["feature_views"]} <= registered:
                return False
        except Exception:  # noqa: BLE001 - an unreadable registry is re-applied below
            pass
    objects = defs["entities"] + defs["data_sources"] + defs["feature_views"] + defs["feature_services"]
    store.apply(objects)
    state["applied"] = key
    write_json(state, state_path(cfg, dataset))
    return True


def latest_in_window(table: pa.Table, key: str, window: Window) -> pa.Table:
    """The latest row of each entity with ``window.start <= event_timestamp < window.end``."""
    ts = table.column(S.EVENT_TIMESTAMP).to_numpy()  # datetime64[us]; UTC by construction
    start = np.datetime64(window.start.tz_convert("UTC").tz_localize(None).to_datetime64(), "us")
    end = np.datetime64(window.end.tz_convert("UTC").tz_localize(None).to_datetime64(), "us")
    rows = np.flatnonzero((ts >= start) & (ts < end))
    keys = table.column(key).to_numpy()[rows]
    order = np.lexsort((ts[rows], keys))  # by entity, then time
    last = np.r_[keys[order][1:] != keys[order][:-1], True] if len(rows) else np.zeros(0, bool)
    return table.take(pa.array(rows[order][last]))


def _entity(view: str) -> str:
    return S.ITEM_ID if view == ITEM_STATS_VIEW else S.USER_ID


def _rows_to_write(cfg: Settings, dataset: str, view: str, window: Window, previous: dict[str, pa.Table] | None,
                   touched_users: np.ndarray | None, table: pa.Table | None = None) -> pa.Table:
    """The latest row in ``window`` of each entity of a view; with ``previous``, only the rows that differ
    from it, plus those of ``touched_users``. ``table``: the view's feature table as written (else read)."""
    entity = _entity(view)
    if table is None:
        table = pq.read_table(store_dir(cfg, dataset) / "data" / f"{TABLES[view]}.parquet")
    latest = latest_in_window(table, entity, window)
    if previous is not None and view in previous:
        features_of = [c for c in latest.column_names if c not in (entity, S.EVENT_TIMESTAMP)]
        keep = feature_delta.changed_rows(latest, previous[view], entity, features_of)
        if entity == S.USER_ID and touched_users is not None and len(touched_users):
            keep |= np.isin(latest.column(entity).to_numpy(), touched_users)
        latest = latest.filter(pa.array(keep))
    return latest


def _write_online(store: "FeatureStore", view: str, rows: pa.Table, batch: int) -> None:
    """Write rows through Feast's online write API, stamped with the time of writing."""
    for lo in range(0, rows.num_rows, batch):
        frame = rows.slice(lo, batch).to_pandas()
        for col in (S.RECENT_ITEM_IDS, S.RECENT_TIMESTAMPS):  # Feast wants Python lists for arrays
            if col in frame:
                frame[col] = [v.tolist() for v in frame[col]]
        frame[S.EVENT_TIMESTAMP] = write_stamp()  # a rebuild replaces what the service wrote before it
        store.write_to_online_store(view, frame)


_EPOCH = pd.Timestamp(0, tz="UTC")


def _materialize_with_feast(cfg: Settings, dataset: str, window: Window, store: "FeatureStore",
                            done: dict[str, Any] | None, previous: dict[str, pa.Table] | None,
                            touched_users: np.ndarray | None, batch: int) -> dict[str, Any]:
    """``FeatureStore.materialize`` per view from the PostgreSQL tables; the registry records each interval.

    Without ``previous`` every view is materialised over the window (item_stats from the epoch: its rows
    keep the stamp of their last change, see ``offline_tables``). With it (an increment), each view over
    the time since the last materialisation only: the users with new events and the items whose
    statistics moved. A changed user row stamped before that range (a late event) is not in it; those
    rows are written directly, so the online values end as after a full materialisation.
    """
    url, schema = offline_url(cfg), project_name(dataset)
    last = window.end - pd.Timedelta(microseconds=1)  # Feast's range includes its end; the window does not
    prev_end = pd.Timestamp(done["window"]["end"]) if previous is not None and done else None
    if prev_end is not None and prev_end > window.end:  # the window moved back: everything again
        prev_end = None
    rows: dict[str, int] = {}
    late: dict[str, int] = {}
    for view, table in TABLES.items():
        if prev_end is None:
            lo = _EPOCH if view == ITEM_STATS_VIEW else window.start
        elif view == ITEM_STATS_VIEW:  # a changed item is stamped one second before the window end
            lo = min(prev_end, window.end - pd.Timedelta(seconds=1))
        else:
            lo = max(prev_end, window.start)
        rows[view] = offline_tables.entities_in_range(url, schema, table, lo.to_pydatetime(), last.to_pydatetime())
        with contextlib.redirect_stdout(sys.stderr):  # Feast prints progress; stdout may carry --json output
            store.materialize(lo.to_pydatetime(), last.to_pydatetime(), feature_views=[view])
        if prev_end is not None and view != ITEM_STATS_VIEW:
            changed = _rows_to_write(cfg, dataset, view, window, previous, touched_users)
            ts = changed.column(S.EVENT_TIMESTAMP).to_numpy()  # datetime64[us], UTC
            before = changed.filter(pa.array(ts < np.datetime64(lo.tz_convert("UTC").tz_localize(None), "us")))
            _write_online(store, view, before, batch)
            late[view] = before.num_rows
            rows[view] += before.num_rows
    return {"rows": rows, "changed_only": prev_end is not None, "by": "feast", "late_rows": late}


def materialize(cfg: Settings, dataset: str, window: Window, fingerprint: str,
                store: "FeatureStore | None" = None, force: bool = False, batch: int = 10_000,
                previous: dict[str, pa.Table] | None = None, touched_users: np.ndarray | None = None,
                tables: dict[str, pa.Table] | None = None) -> bool:
    """Put the latest row of every entity inside ``window`` into the online store (True when it ran).

    File offline store: what ``feast materialize`` does, written through Feast's online write API (see
    the module doc). PostgreSQL offline store: ``FeatureStore.materialize`` itself
    (:func:`_materialize_with_feast`). Skipped when the same window of the same data was already
    written to the same stores.

    ``previous`` (per view, the rows written last time) limits the write to new or changed rows plus
    ``touched_users`` (landed events): the online values end the same as after writing every row.
    ``tables``: the feature tables just written (by table name), so the file store need not read them back.
    """
    store = store or get_store(cfg, dataset)
    state = load_state(cfg, dataset)
    key = {"window": window.as_dict(), "fingerprint": fingerprint, "stores": store_identity(cfg, dataset)}
    if not force and state.get("materialized") == key:
        return False
    if cfg.features.offline_store == "postgres":
        written = _materialize_with_feast(cfg, dataset, window, store, state.get("materialized"), previous,
                                          touched_users, batch)
    else:
        written = {"rows": {}, "changed_only": previous is not None, "by": "online_write"}
        for view in TABLES:
            rows = _rows_to_write(cfg, dataset, view, window, previous, touched_users,
                                  (tables or {}).get(TABLES[view]))
            _write_online(store, view, rows, batch)
            written["rows"][view] = rows.num_rows
    state["materialized"] = key
    state["written"] = written
    write_json(state, state_path(cfg, dataset))
    return True


def _previous_latest(cfg: Settings, dataset: str, state: dict[str, Any]) -> dict[str, pa.Table] | None:
    """The rows the last materialisation wrote, when the tables and stores are still those; else None."""
    done = state.get("materialized") or {}
    data_dir = store_dir(cfg, dataset) / "data"
    if (done.get("stores") != store_identity(cfg, dataset) or (state.get("tables") or {}).get("fingerprint")
            != done.get("fingerprint") or not all((data_dir / f"{t}.parquet").exists() for t in TABLES.values())):
        return None
    w = Window(pd.Timestamp(done["window"]["start"]), pd.Timestamp(done["window"]["end"]))
    return {view: latest_in_window(pq.read_table(data_dir / f"{t}.parquet"), _entity(view), w)
            for view, t in TABLES.items()}


def materialize_features(cfg: Settings, dataset: str, start: str | datetime | None = None,
                         end: str | datetime | None = None, force: bool = False,
                         interactions: pd.DataFrame | None = None, incremental: bool = False) -> dict[str, Any]:
    """Build the feature tables, apply the repo and materialise the window. Idempotent.

    ``interactions`` defaults to the dataset's prepared (validated) interactions; the window defaults to
    the whole history, or its last ``features.window_days`` days. Re-running with the same data and
    window rewrites nothing, re-applies nothing and re-materialises nothing (``force`` redoes all three).
    ``incremental``: write online only the rows that differ from the last materialisation (see
    :func:`materialize`); the online values end the same.
    """
    with open_log(cfg) as log:  # events landed so far: the published data holds them (or quarantined them)
        log_upto = log.watermark(dataset, eventlog.EVENTS)
    inter = data.load_interactions(cfg, dataset) if interactions is None else interactions
    items = data.load_items(cfg, dataset)
    item_ids = items[S.ITEM_ID].to_numpy(np.int64)
    window = default_window(inter, cfg.features.window_days, start, end)
    recent = recent_len(cfg)
    fp = data_fingerprint(inter, item_ids, recent, window, cfg.evaluate.tail_share)
    root = store_dir(cfg, dataset)
    state = load_state(cfg, dataset)

    files_present = all((root / "data" / f"{t}.parquet").exists() for t in TABLES.values())
    rebuilt = force or state.get("tables", {}).get("fingerprint") != fp or not files_present
    previous, touched, tables = None, None, None
    old_upto = (state.get("tables") or {}).get("log_upto")
    if rebuilt and not force and incremental and old_upto is not None:
        # An increment: write only the rows it changes (and the users whose events landed since).
        previous = _previous_latest(cfg, dataset, state)
        with open_log(cfg) as log:
            landed = log.read(dataset, eventlog.EVENTS, after=int(old_upto), upto=log_upto)
        touched = landed[S.USER_ID].to_numpy(np.int64) if len(landed) else np.zeros(0, np.int64)
    seconds, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    old_fp = (state.get("tables") or {}).get("fingerprint")
    base = None
    if rebuilt and not force and cfg.features.offline_store == "postgres" and files_present and old_fp:
        base = (old_fp, read_tables(cfg, dataset))  # what the PostgreSQL tables hold if their sync completed
    if rebuilt:
        tables = build_tables(inter, item_ids, recent, window, cfg.evaluate.tail_share)
        rows = write_tables(cfg, dataset, tables)
        state["tables"] = {"fingerprint": fp, "rows": rows, "recent_items": recent, "window": window.as_dict(),
                           "log_upto": log_upto}
        write_json(state, state_path(cfg, dataset))
    lap("tables")
    synced = sync_offline(cfg, dataset, fp, tables, force=force, base=base)
    lap("offline_sync")
    store = get_store(cfg, dataset)
    applied = apply(cfg, dataset, store, force=force)
    lap("apply")
    materialized = materialize(cfg, dataset, window, fp, store, force=force, previous=previous, touched_users=touched,
                               tables=tables)
    lap("materialize")
    state = load_state(cfg, dataset)
    return {
        "dataset": dataset, "store": str(root), "project": project_name(dataset),
        "online_store": cfg.features.online_store, "registry": cfg.features.registry,
        "offline_store": cfg.features.offline_store, "offline_synced": synced,
        "fingerprint": fp, "window": window.as_dict(), "recent_items": recent,
        "rows": state["tables"]["rows"], "log_upto": state["tables"].get("log_upto"), "rebuilt": rebuilt,
        "applied": applied, "materialized": materialized,
        "written": state.get("written") if materialized else None,
        "feature_service": cfg.features.feature_service, "seconds": seconds,
    }


def teardown(cfg: Settings, dataset: str) -> None:
    """Remove the dataset's online tables/keys and registry entries (the feature tables stay: the Parquet
    files, and the PostgreSQL tables of the postgres offline store)."""
    store = get_store(cfg, dataset)
    # Not FeatureStore.teardown(): it deletes *every* project of the registry, which on a shared SQL
    # registry would take other datasets' (and other teams') definitions with it.
    store._get_provider().teardown_infra(store.project, store.list_feature_views(), store.list_entities())
    try:
        store.registry.delete_project(store.project, commit=True)
    except Exception as exc:  # noqa: BLE001 - already gone is fine
        log.info("registry project %s not deleted: %s", store.project, exc)
    path = state_path(cfg, dataset)
    if path.exists():
        state = read_json(path)
        state.pop("applied", None)
        state.pop("materialized", None)
        write_json(state, path)


# ==================================================================================================
# Reading features
# ==================================================================================================
def _rows_to_dicts(result: dict[str, list], key: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for i, entity in enumerate(result[key]):
        out[int(entity)] = {name: values[i] for name, values in result.items() if name != key}
    return out


def online_user_features(store: "FeatureStore", user_ids: Iterable[int], service: str = "recommender_v1",
                         feature_service: Any = None) -> dict[int, dict[str, Any]]:
    """Online features of users: ``{user_id: {recent_item_ids, recent_timestamps, event_count, ...}}``.

    A user absent from the online store has every value None. ``feature_service`` (a FeatureService
    object fetched once) saves a registry lookup per request.
    """
    fs = feature_service if feature_service is not None else store.get_feature_service(service)
    rows = [{S.USER_ID: int(u)} for u in user_ids]
    return _rows_to_dicts(store.get_online_features(features=fs, entity_rows=rows).to_dict(), S.USER_ID)


def online_item_stats(store: "FeatureStore", item_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    fs = store.get_feature_service(ITEM_STATS_SERVICE)
    rows = [{S.ITEM_ID: int(i)} for i in item_ids]
    return _rows_to_dicts(store.get_online_features(features=fs, entity_rows=rows).to_dict(), S.ITEM_ID)


_ROW = "learn_entity_row"  # the entity frame's row number, through Feast and back


def historical_features(cfg: Settings, dataset: str, entity_df: pd.DataFrame,
                        service: str | None = None, store: "FeatureStore | None" = None) -> pd.DataFrame:
    """Point-in-time-correct features for ``entity_df`` (``user_id``, ``event_timestamp``, any extra columns).

    Each row gets the latest feature row with a timestamp <= its own, from the offline store (Parquet or
    PostgreSQL). Rows come back in ``entity_df``'s order with its columns as they were: only the keys and
    the query time go through Feast, the rest is joined back by row (PostgreSQL would return its
    timestamps without their time zone).
    """
    missing = {S.USER_ID, S.EVENT_TIMESTAMP} - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks column(s) {sorted(missing)}")
    store = store or get_store(cfg, dataset)
    fs = store.get_feature_service(service or cfg.features.feature_service)
    df = entity_df.reset_index(drop=True)
    df[S.EVENT_TIMESTAMP] = pd.to_datetime(df[S.EVENT_TIMESTAMP], utc=True)
    query = df[[S.USER_ID, S.EVENT_TIMESTAMP]].assign(**{_ROW: np.arange(len(df), dtype=np.int64)})
    got = store.get_historical_features(entity_df=query, features=fs).to_df()
    got = got.drop(columns=[S.USER_ID, S.EVENT_TIMESTAMP]).set_index(_ROW).reindex(np.arange(len(df)))
    return pd.concat([df, got.reset_index(drop=True)], axis=1)


def training_examples(cfg: Settings, dataset: str, protocol: str = S.PROTOCOL_LOO, stage: str = S.TEST,
                      store: "FeatureStore | None" = None) -> pd.DataFrame:
    """Each target event of a split stage with the user's features just before it, read from Feast.

    The query time is one microsecond before the target's timestamp, so the history excludes the
    target and everything logged at the same instant (no leakage); columns: user_id, item_id (the
    target), event_timestamp (the target's time) and the feature service's features.
    """
    split = load_split(cfg, dataset, protocol)
    targets = split.loc[split[S.SPLIT] == stage, [S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]].reset_index(drop=True)
    query = targets.rename(columns={S.EVENT_TIMESTAMP: "target_timestamp"})
    query[S.EVENT_TIMESTAMP] = query["target_timestamp"] - timedelta(microseconds=1)
    out = historical_features(cfg, dataset, query, store=store)
    out = out.drop(columns=[S.EVENT_TIMESTAMP]).rename(columns={"target_timestamp": S.EVENT_TIMESTAMP})
    return out.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable").reset_index(drop=True)
