"""Feast features: the feature tables (pure), array features round-trip, idempotent materialisation,
point-in-time training reads, online event pushes, and the production stack against Redis + PostgreSQL."""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.data import datasets as data
from learn_tasks.online import features, updates
from learn_tasks.config import Settings


def _events(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame({
        S.USER_ID: np.array([r[0] for r in rows], np.int64),
        S.ITEM_ID: np.array([r[1] for r in rows], np.int64),
        S.EVENT_TIMESTAMP: pd.to_datetime([r[2] for r in rows], unit="s", utc=True).astype("datetime64[us, UTC]"),
    })


# ------------------------------------------------------------------------------------- pure functions
def test_build_tables_by_hand() -> None:
    # user 1: items 10, 11 (same second), 12, 10 ; user 2: item 12 once. L = 2.
    inter = _events([(1, 10, 100), (1, 11, 200), (1, 12, 200), (1, 10, 300), (2, 12, 150)])
    window = features.default_window(inter)
    tabs = features.build_tables(inter, np.array([10, 11, 12, 13]), recent=2, window=window, tail_share=0.2)
    recent = tabs["user_recent"].to_pandas()
    assert recent[S.USER_ID].tolist() == [1, 1, 1, 2]  # one row per (user, distinct time)
    assert [list(x) for x in recent[S.RECENT_ITEM_IDS]] == [[10], [11, 12], [12, 10], [12]]
    assert [list(x) for x in recent[S.RECENT_TIMESTAMPS]] == [[100], [200, 200], [200, 300], [150]]
    act = tabs["user_activity"].to_pandas()
    assert act[S.EVENT_COUNT].tolist() == [1, 3, 4, 1]
    assert act[S.DISTINCT_ITEMS].tolist() == [1, 3, 3, 1]
    assert act[S.FIRST_SEEN].tolist() == [100, 100, 100, 150]
    assert act[S.LAST_SEEN].tolist() == [100, 200, 300, 150]
    items = tabs["item_stats"].to_pandas().set_index(S.ITEM_ID)
    assert items[S.POPULARITY].to_dict() == {10: 2, 11: 1, 12: 2, 13: 0}
    assert items[S.FIRST_SEEN].to_dict() == {10: 100, 11: 200, 12: 150, 13: 0}
    assert items[S.IS_COLD_START].to_dict() == {10: False, 11: False, 12: False, 13: True}
    # 5 events, tail_share 0.2 -> the least popular warm items holding <= 1 event: item 11
    assert items[S.IS_LONG_TAIL].to_dict() == {10: False, 11: True, 12: False, 13: False}
    # every item row sits inside the window that gets materialised
    assert (items[S.EVENT_TIMESTAMP] < window.end).all() and (items[S.EVENT_TIMESTAMP] >= window.start).all()


def test_window_defaults_and_errors() -> None:
    inter = _events([(1, 10, 100), (1, 11, 86400 * 10)])
    w = features.default_window(inter)
    assert w.start == pd.Timestamp(100, unit="s", tz="UTC")
    assert w.end == pd.Timestamp(86400 * 10 + 1, unit="s", tz="UTC")
    w = features.default_window(inter, window_days=2)
    assert w.start == w.end - pd.Timedelta(days=2)
    with pytest.raises(features.FeaturesError, match="empty window"):
        features.default_window(inter, start="2030-01-01", end="2020-01-01")


def test_append_event_keeps_time_order_and_length() -> None:
    assert updates.append_event(None, None, 5, 10, recent=3) == ([5], [10])
    assert updates.append_event([1, 2, 3], [1, 2, 3], 9, 4, recent=3) == ([2, 3, 9], [2, 3, 4])
    # a late event is placed by its time, then the oldest is dropped
    assert updates.append_event([1, 2, 3], [1, 5, 9], 7, 6, recent=3) == ([2, 7, 3], [5, 6, 9])


def test_project_name_and_production_needs_both_and_env_only(settings: Settings) -> None:
    assert features.project_name("amazon-books") == "learn_amazon_books"
    with pytest.raises(features.FeaturesError, match="both"):
        features._template(settings.with_overrides(features={"online_store": "redis"}))
    with pytest.raises(features.FeaturesError, match="LEARN_FEATURES__REGISTRY_URL"):
        features._env_values(settings.with_overrides(features={"online_store": "redis", "registry": "sql"}), "x")


# ------------------------------------------------------------------------------------- real Feast
@pytest.mark.integration
def test_run_roundtrip_idempotent_and_point_in_time(settings: Settings, synth_dataset: str) -> None:
    cfg = settings.with_overrides(features={"recent_items": 5})
    first = features.materialize_features(cfg, synth_dataset)
    assert first["rebuilt"] and first["applied"] and first["materialized"]
    root = Path(first["store"])
    rendered = (root / "feature_store.yaml").read_text()
    assert "project: learn_synth" in rendered and "${" not in rendered.split("project:")[0]

    inter = data.load_interactions(cfg, synth_dataset)
    store = features.get_store(cfg, synth_dataset)
    users = inter[S.USER_ID].drop_duplicates().head(5).tolist()
    online = features.online_user_features(store, users + [999_999])
    for u in users:  # Array(Int64) features round-trip: the last 5 events, oldest first
        ev = inter[inter[S.USER_ID] == u]
        assert online[u][S.RECENT_ITEM_IDS] == ev[S.ITEM_ID].tolist()[-5:]
        assert online[u][S.RECENT_TIMESTAMPS] == features.epoch_seconds(ev[S.EVENT_TIMESTAMP]).tolist()[-5:]
        assert online[u][S.EVENT_COUNT] == len(ev)
        assert online[u][S.DISTINCT_ITEMS] == ev[S.ITEM_ID].nunique()
    assert online[999_999][S.RECENT_ITEM_IDS] is None  # unknown user: no features, no error

    # Re-running the same window changes nothing: no rewrite, no apply, no materialisation.
    files = {p: p.stat().st_mtime_ns for p in (root / "data").glob("*.parquet")}
    registry_mtime = (root / "registry.db").stat().st_mtime_ns
    again = features.materialize_features(cfg, synth_dataset)
    assert not (again["rebuilt"] or again["applied"] or again["materialized"])
    assert {p: p.stat().st_mtime_ns for p in (root / "data").glob("*.parquet")} == files
    assert (root / "registry.db").stat().st_mtime_ns == registry_mtime
    # ... and forcing it yields the same online values.
    features.materialize_features(cfg, synth_dataset, force=True)
    assert features.online_user_features(features.get_store(cfg, synth_dataset), users) == {u: online[u] for u in users}

    # Point-in-time: the history of a target excludes the target and anything at the same instant.
    ex = features.training_examples(cfg, synth_dataset, protocol=S.PROTOCOL_LOO, stage=S.TEST, store=store)
    row = ex.iloc[0]
    ev = inter[inter[S.USER_ID] == row[S.USER_ID]]
    before = ev[ev[S.EVENT_TIMESTAMP] < row[S.EVENT_TIMESTAMP]]
    assert list(row[S.RECENT_ITEM_IDS]) == before[S.ITEM_ID].tolist()[-5:]
    assert row[S.EVENT_COUNT] == len(before)

    # An online push shows up in the next read.
    u = users[0]
    new = updates.push_event(store, u, 4242, datetime(2030, 1, 1, tzinfo=timezone.utc), recent=5,
                              current=online[u])
    after = features.online_user_features(store, [u])[u]
    assert after[S.RECENT_ITEM_IDS] == new[S.RECENT_ITEM_IDS] == online[u][S.RECENT_ITEM_IDS][-4:] + [4242]
    assert after[S.EVENT_COUNT] == online[u][S.EVENT_COUNT] + 1


@pytest.mark.integration
def test_bounded_window_materialises_only_recent_users(settings: Settings, synth_dataset: str) -> None:
    inter = data.load_interactions(settings, synth_dataset)
    end = inter[S.EVENT_TIMESTAMP].max().floor("s") + pd.Timedelta(seconds=1)
    start = end - pd.Timedelta(days=20)
    features.materialize_features(settings, synth_dataset, start=start, end=end)
    last = inter.groupby(S.USER_ID)[S.EVENT_TIMESTAMP].max()
    active, idle = last[last >= start].index[:3].tolist(), last[last < start].index[:3].tolist()
    assert active and idle
    online = features.online_user_features(features.get_store(settings, synth_dataset), active + idle)
    assert all(online[u][S.RECENT_ITEM_IDS] for u in active)
    assert all(online[u][S.RECENT_ITEM_IDS] is None for u in idle)


# ------------------------------------------------------------------------------------- production stack
@pytest.mark.production
def test_production_stack_redis_and_sql_registry(settings: Settings, synth_dataset: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis on 127.0.0.1:6379: {exc}")
    registry_url = os.environ.get("LEARN_TEST_REGISTRY_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    # A unique dataset name keeps this run's Redis keys and registry rows apart from any other.
    name = f"prod_{uuid.uuid4().hex[:8]}"
    src = settings.paths.dataset(synth_dataset)
    dst = settings.paths.dataset(name)
    dst.mkdir(parents=True)
    for f in src.glob("*.*"):
        (dst / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LEARN_FEATURES__REGISTRY_URL", registry_url)  # credentials: environment only
    from learn_tasks.config import load_settings

    cfg = load_settings(overrides=["features.online_store=redis", "features.registry=sql", "features.recent_items=5"])
    try:
        first = features.materialize_features(cfg, name)
        rendered = (Path(first["store"]) / "feature_store.yaml").read_text()
        assert "${LEARN_FEATURES__REGISTRY_URL}" in rendered and registry_url not in rendered
        assert "${LEARN_FEATURES__REDIS_URL}" in rendered
        inter = data.load_interactions(cfg, name)
        u = int(inter[S.USER_ID].iloc[0])
        store = features.get_store(cfg, name)
        got = features.online_user_features(store, [u])[u]
        assert got[S.RECENT_ITEM_IDS] == inter[inter[S.USER_ID] == u][S.ITEM_ID].tolist()[-5:]
        again = features.materialize_features(cfg, name)
        assert not (again["applied"] or again["materialized"])
        assert features.online_user_features(store, [u])[u] == got
    finally:
        features.teardown(cfg, name)


@pytest.mark.integration
def test_incremental_refresh_writes_only_changed_rows_and_ends_like_a_full_rebuild(
        settings: Settings, synth_dataset: str) -> None:
    """After an increment (new events of two users, one of them on a new item), the incremental refresh
    writes only the rows that changed, yet the online store holds exactly what a full rebuild writes."""
    from learn_tasks.storage import write_parquet

    cfg = settings.with_overrides(features={"recent_items": 5})
    first = features.materialize_features(cfg, synth_dataset)
    assert first["written"]["changed_only"] is False
    inter = data.load_interactions(cfg, synth_dataset)
    items = data.load_items(cfg, synth_dataset)
    users = inter[S.USER_ID].drop_duplicates().head(2).tolist()
    new_item = int(items[S.ITEM_ID].max()) + 1
    when = inter[S.EVENT_TIMESTAMP].max() + pd.Timedelta(hours=1)
    added = pd.DataFrame({S.USER_ID: users, S.ITEM_ID: [int(inter[S.ITEM_ID].iloc[0]), new_item],
                          S.EVENT_TIMESTAMP: [when, when + pd.Timedelta(minutes=1)]})
    for col in inter.columns.difference(added.columns):
        added[col] = inter[col].iloc[0]
    base = cfg.paths.dataset(synth_dataset)
    write_parquet(pd.concat([inter, added[inter.columns]], ignore_index=True), base / "interactions.parquet")
    new_items = pd.concat([items, items.tail(1).assign(**{S.ITEM_ID: new_item})], ignore_index=True)
    write_parquet(new_items, base / "items.parquet")

    inc = features.materialize_features(cfg, synth_dataset, incremental=True)
    assert inc["rebuilt"] and inc["materialized"] and inc["written"]["changed_only"]
    n_users = inter[S.USER_ID].nunique()
    written = inc["written"]["rows"]
    assert written[features.USER_RECENT_VIEW] == written[features.USER_ACTIVITY_VIEW] == 2  # the two users
    assert 1 <= written[features.ITEM_STATS_VIEW] < len(new_items)  # the new item, the touched ones, slice moves
    store = features.get_store(cfg, synth_dataset)
    all_users = inter[S.USER_ID].unique().tolist()
    all_items = new_items[S.ITEM_ID].tolist()
    after_inc = (features.online_user_features(store, all_users), features.online_item_stats(store, all_items))
    assert after_inc[0][users[1]][S.RECENT_ITEM_IDS][-1] == new_item

    full = features.materialize_features(cfg, synth_dataset, force=True)
    assert full["written"]["rows"][features.USER_RECENT_VIEW] == n_users  # a full rebuild writes every row
    store = features.get_store(cfg, synth_dataset)
    assert (features.online_user_features(store, all_users), features.online_item_stats(store, all_items)) == after_inc
