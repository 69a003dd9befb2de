"""Feast features: the feature tables (pure), array features round-trip, idempotent materialisation,
point-in-time training reads, online event pushes, and the production stack against Redis + PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from learn_tasks import schema as S
from learn_tasks.data import datasets as data
from learn_tasks.online import feast_config, feast_postgres, feature_delta, features, offline_tables, updates
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
        feast_config._template(settings.with_overrides(features={"online_store": "redis"}))
    with pytest.raises(features.FeaturesError, match="LEARN_FEATURES__REGISTRY_URL"):
        feast_config._env_values(settings.with_overrides(features={"online_store": "redis", "registry": "sql"}), "x")
    with pytest.raises(features.FeaturesError, match="production feature store"):
        feast_config._template(settings.with_overrides(features={"offline_store": "postgres"}))


def test_offline_store_urls_are_parsed_and_bad_ones_named() -> None:
    f = offline_tables.connection_fields("postgresql+psycopg2://feast:p%40ss@db.example:6543/feast?sslmode=require")
    assert f == {"host": "db.example", "port": 6543, "database": "feast", "user": "feast", "password": "p@ss",
                 "sslmode": "require"}
    f = offline_tables.connection_fields("postgres://postgres@127.0.0.1/learn")
    assert (f["port"], f["password"], f["sslmode"]) == (5432, "", "prefer")
    with pytest.raises(offline_tables.OfflineTablesError, match="scheme 'mysql'"):
        offline_tables.connection_fields("mysql://u@h/db")
    with pytest.raises(offline_tables.OfflineTablesError, match="database '\\(none\\)'"):
        offline_tables.connection_fields("postgresql://u@h:5432/")
    with pytest.raises(offline_tables.OfflineTablesError, match="placeholder"):
        offline_tables.connection_fields("${LEARN_FEATURES__OFFLINE_URL}")  # what Feast leaves of an unset variable
    assert issubclass(offline_tables.OfflineTablesError, features.FeaturesError)  # `learn features` reports it


def test_postgres_offline_store_renders_and_loads_without_secrets(settings: Settings) -> None:
    """The production template with each offline store; the URL stays a placeholder, the registry's when
    no offline URL of its own is set, and Feast loads the URL-configured PostgreSQL store from it."""
    secret = "postgresql+psycopg2://feast:s3cret@db.example:5432/feast"
    prod = {"online_store": "redis", "registry": "sql", "registry_url": secret}
    cfg = settings.with_overrides(features={**prod, "offline_store": "postgres"})
    conf = features.repo_config(cfg, "books")
    rendered = (features.store_dir(cfg, "books") / "feature_store.yaml").read_text()
    assert "s3cret" not in rendered
    assert "url: ${LEARN_FEATURES__REGISTRY_URL}" in rendered and "db_schema: learn_books" in rendered
    assert conf.offline_store.type == feast_postgres.STORE_TYPE
    assert (conf.offline_store.host, conf.offline_store.database, conf.offline_store.password,
            conf.offline_store.db_schema) == ("db.example", "feast", "s3cret", "learn_books")

    own = settings.with_overrides(features={**prod, "offline_store": "postgres",
                                            "offline_url": "postgresql://off@db2.example/offline"})
    assert features.repo_config(own, "books").offline_store.host == "db2.example"
    rendered = (features.store_dir(own, "books") / "feature_store.yaml").read_text()
    assert "url: ${LEARN_FEATURES__OFFLINE_URL}" in rendered
    assert features.store_identity(own, "books") != features.store_identity(cfg, "books")

    file_cfg = settings.with_overrides(features=prod)  # Redis + SQL registry, Parquet offline tables
    assert features.repo_config(file_cfg, "books").offline_store.type == "file"
    rendered = yaml.safe_load((features.store_dir(file_cfg, "books") / "feature_store.yaml").read_text())
    assert rendered["offline_store"] == {"type": "file"} and rendered["online_store"]["type"] == "redis"


def test_table_delta_finds_exactly_the_changed_and_removed_rows() -> None:
    import pyarrow as pa

    def table(rows: list[tuple[int, int, list[int], bool]]) -> pa.Table:
        return pa.table({S.USER_ID: pa.array([r[0] for r in rows], pa.int64()),
                         S.EVENT_TIMESTAMP: pa.array([r[1] * 1_000_000 for r in rows], pa.timestamp("us", tz="UTC")),
                         S.RECENT_ITEM_IDS: pa.array([r[2] for r in rows], pa.list_(pa.int64())),
                         S.IS_COLD_START: pa.array([r[3] for r in rows], pa.bool_())})

    old = table([(1, 10, [1, 2], False), (1, 20, [1, 2, 3], False), (2, 10, [7], True), (3, 5, [], False),
                 (4, 1, [9, 9], False)])
    new = table([(4, 1, [9, 9], False),           # unchanged (rows may come in any order)
                 (1, 20, [1, 2, 4], False),       # same length, one element differs
                 (1, 10, [1, 2], False),          # unchanged
                 (2, 10, [7], False),             # a scalar differs
                 (3, 5, [5], False),              # an empty list got an element
                 (5, 1, [1], False)])             # a new key
    upsert, delete = feature_delta.table_delta(new, old, [S.USER_ID, S.EVENT_TIMESTAMP],
                                               [S.RECENT_ITEM_IDS, S.IS_COLD_START])
    assert upsert.tolist() == [False, True, False, True, True, True]
    assert delete.tolist() == [False] * 5
    gone = feature_delta.table_delta(old.slice(0, 2), old, [S.USER_ID, S.EVENT_TIMESTAMP], [S.RECENT_ITEM_IDS])[1]
    assert gone.tolist() == [False, False, True, True, True]


def test_data_sources_follow_the_offline_store() -> None:
    """One definition of the feature views; the batch sources change kind, never name."""
    from feast import FileSource
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

    file_defs = features.load_definitions(offline_store="file")
    pg_defs = features.load_definitions(offline_store="postgres")
    batch = {v.name: v.batch_source for v in pg_defs["feature_views"]}
    assert all(isinstance(s, PostgreSQLSource) for s in batch.values())
    assert {n: s.get_table_query_string() for n, s in batch.items()} == {
        v: t for v, t in features.TABLES.items()}
    assert all(isinstance(v.batch_source, FileSource) for v in file_defs["feature_views"])
    assert ({v.name: v.batch_source.name for v in file_defs["feature_views"]} ==
            {v.name: v.batch_source.name for v in pg_defs["feature_views"]})
    assert "LEARN_FEAST_OFFLINE_STORE" not in os.environ  # set only while the definitions load


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


# ------------------------------------------------------------------------------------- PostgreSQL offline store
def _assert_offline_tables_hold_the_parquet(root: Path, url: str, schema: str) -> None:
    """The PostgreSQL user tables equal the Parquet ones, row for row; item_stats equals them in values."""
    for table in ("user_recent", "user_activity", "item_stats"):
        keys = list(offline_tables.KEYS[table])
        pq_rows = pd.read_parquet(root / "data" / f"{table}.parquet").sort_values(keys).reset_index(drop=True)
        pg_rows = offline_tables.read_table(url, schema, table)
        assert len(pg_rows) == len(pq_rows), table
        for col in pq_rows.columns:
            if table == "item_stats" and col == S.EVENT_TIMESTAMP:
                continue  # there: the window end at which the item's values last changed
            assert [list(v) if isinstance(v, (list, np.ndarray)) else v for v in pq_rows[col]] == \
                   [list(v) if isinstance(v, (list, np.ndarray)) else v for v in pg_rows[col]], (table, col)


def _redis_or_skip() -> None:
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis on 127.0.0.1:6379: {exc}")


def _feast_cli(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The `feast` command of this environment, run in the rendered repo directory as an operator would."""
    feast = Path(sys.executable).with_name("feast")
    return subprocess.run([str(feast), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _intervals(cfg: Settings, dataset: str) -> dict[str, list[tuple[datetime, datetime]]]:
    store = features.get_store(cfg, dataset)  # a new store reads the registry afresh
    return {fv.name: list(fv.materialization_intervals) for fv in store.list_feature_views()}


def _utc(t: datetime | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _online(cfg: Settings, dataset: str, users: list[int], items: list[int]) -> tuple[dict, dict]:
    store = features.get_store(cfg, dataset)
    return features.online_user_features(store, users), features.online_item_stats(store, items)


@pytest.mark.production
def test_postgres_offline_store_materialises_through_feast_and_the_cli_continues(
        settings: Settings, synth_dataset: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The production profile's offline store: the tables in PostgreSQL, materialisation by Feast (intervals in
    the registry), `feast materialize-incremental` from the rendered repo directory, and an increment (new
    events and a late one) that writes only the changed rows yet ends like a full materialisation."""
    from learn_tasks.config import load_settings
    from learn_tasks.storage import write_parquet

    _redis_or_skip()
    name = f"pgoff_{uuid.uuid4().hex[:8]}"  # its own Feast project: Redis keys, registry rows, PostgreSQL schema
    src, dst = settings.paths.dataset(synth_dataset), settings.paths.dataset(name)
    dst.mkdir(parents=True)
    for f in src.glob("*.*"):
        (dst / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LEARN_FEATURES__REGISTRY_URL", pg_url)  # credentials: environment only
    cfg = load_settings(overrides=["features.online_store=redis", "features.registry=sql",
                                   "features.offline_store=postgres", "features.recent_items=5"])
    schema = features.project_name(name)
    try:
        first = features.materialize_features(cfg, name)
        assert first["materialized"] and first["written"]["by"] == "feast" and not first["written"]["changed_only"]
        assert set(first["offline_synced"]) == set(features.TABLES.values())
        root = Path(first["store"])
        rendered = (root / "feature_store.yaml").read_text()
        assert "url: ${LEARN_FEATURES__REGISTRY_URL}" in rendered and pg_url not in rendered

        _assert_offline_tables_hold_the_parquet(root, pg_url, schema)

        intervals = _intervals(cfg, name)
        assert set(intervals) == set(features.TABLES) and all(intervals.values())
        window_end = pd.Timestamp(first["window"]["end"])

        inter = data.load_interactions(cfg, name)
        items = data.load_items(cfg, name)
        all_users = inter[S.USER_ID].unique().tolist()
        all_items = items[S.ITEM_ID].tolist()
        online = _online(cfg, name, all_users, all_items)
        for u in all_users[:20]:
            ev = inter[inter[S.USER_ID] == u]
            assert online[0][u][S.RECENT_ITEM_IDS] == ev[S.ITEM_ID].tolist()[-5:]
            assert online[0][u][S.EVENT_COUNT] == len(ev)
        stats = pd.read_parquet(root / "data" / "item_stats.parquet").set_index(S.ITEM_ID)
        assert {i: online[1][i][S.POPULARITY] for i in all_items} == stats[S.POPULARITY].to_dict()
        # Point-in-time reads come from PostgreSQL too.
        ex = features.training_examples(cfg, name, protocol=S.PROTOCOL_LOO, stage=S.TEST)
        row = ex.iloc[0]
        ev = inter[inter[S.USER_ID] == row[S.USER_ID]]
        history = ev[ev[S.EVENT_TIMESTAMP] < row[S.EVENT_TIMESTAMP]][S.ITEM_ID].tolist()
        assert list(row[S.RECENT_ITEM_IDS]) == history[-5:]

        # `feast materialize-incremental` in the rendered directory, with the production variables only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEARN_")}
        env.update(LEARN_FEATURES__REGISTRY_URL=pg_url, LEARN_FEATURES__REDIS_URL=cfg.features.redis_url)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        done = _feast_cli(root, env, "materialize-incremental", now.isoformat())
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        after_cli = _intervals(cfg, name)
        for view, spans in after_cli.items():
            assert len(spans) == len(intervals[view]) + 1
            start, end = (_utc(x) for x in spans[-1])
            assert start <= window_end and end == _utc(now)  # it continued where learn stopped
        assert _online(cfg, name, all_users, all_items) == online

        again = features.materialize_features(cfg, name)
        assert not (again["rebuilt"] or again["applied"] or again["materialized"]) and again["offline_synced"] == {}

        # An increment: two users with new events (one on a new item) and a late event of a third user.
        users = inter[S.USER_ID].drop_duplicates().head(3).tolist()
        new_item = int(items[S.ITEM_ID].max()) + 1
        when = inter[S.EVENT_TIMESTAMP].max() + pd.Timedelta(hours=1)
        late_user_last = inter.loc[inter[S.USER_ID] == users[2], S.EVENT_TIMESTAMP].max()
        added = pd.DataFrame({S.USER_ID: users, S.ITEM_ID: [int(inter[S.ITEM_ID].iloc[0]), new_item,
                                                              int(inter[S.ITEM_ID].iloc[1])],
                              S.EVENT_TIMESTAMP: [when, when + pd.Timedelta(minutes=1),
                                                  late_user_last - pd.Timedelta(hours=1)]})
        for col in inter.columns.difference(added.columns):
            added[col] = inter[col].iloc[0]
        write_parquet(pd.concat([inter, added[inter.columns]], ignore_index=True), dst / "interactions.parquet")
        new_items = pd.concat([items, items.tail(1).assign(**{S.ITEM_ID: new_item})], ignore_index=True)
        write_parquet(new_items, dst / "items.parquet")

        inc = features.materialize_features(cfg, name, incremental=True)
        assert inc["rebuilt"] and inc["materialized"] and inc["written"]["changed_only"]
        # PostgreSQL received the difference only: a new row per user and, for the late user, every later row
        # (its event count moved); nothing else was sent.
        late_at = late_user_last - pd.Timedelta(hours=1)
        mine = inter.loc[inter[S.USER_ID] == users[2], S.EVENT_TIMESTAMP].dt.floor("s")
        later = int(mine[mine > late_at].nunique())
        act, rec = inc["offline_synced"]["user_activity"], inc["offline_synced"]["user_recent"]
        assert act["sent"] == act["written"] == 3 + later and act["deleted"] == 0
        assert 3 <= rec["sent"] == rec["written"] <= 3 + later
        assert act["rows"] == first["offline_synced"]["user_activity"]["rows"] + 3
        _assert_offline_tables_hold_the_parquet(root, pg_url, schema)
        written = inc["written"]["rows"]
        # the two users through Feast's range, the late one directly (its rows are stamped before that range)
        assert written[features.USER_RECENT_VIEW] == written[features.USER_ACTIVITY_VIEW] == 3
        assert inc["written"]["late_rows"] == {features.USER_RECENT_VIEW: 1, features.USER_ACTIVITY_VIEW: 1}
        assert 1 <= written[features.ITEM_STATS_VIEW] < len(new_items)
        stamps = offline_tables.read_table(pg_url, schema, "item_stats")[S.EVENT_TIMESTAMP]
        new_stamp = pd.Timestamp(inc["window"]["end"]) - pd.Timedelta(seconds=1)
        assert int((stamps == new_stamp).sum()) == written[features.ITEM_STATS_VIEW]  # only the moved items
        assert all(len(s) == len(after_cli[v]) + 1 for v, s in _intervals(cfg, name).items())
        all_items = new_items[S.ITEM_ID].tolist()
        after_inc = _online(cfg, name, all_users, all_items)
        assert after_inc[0][users[1]][S.RECENT_ITEM_IDS][-1] == new_item
        assert after_inc[0][users[2]][S.EVENT_COUNT] == online[0][users[2]][S.EVENT_COUNT] + 1

        full = features.materialize_features(cfg, name, force=True)
        assert full["written"]["rows"][features.USER_RECENT_VIEW] == len(all_users)
        assert _online(cfg, name, all_users, all_items) == after_inc

        # The window moved back (an explicit earlier end): every item's stamp comes down with it, so the
        # materialisation reaches every item, and the online statistics are those of that window.
        back = features.materialize_features(cfg, name, end=window_end)
        assert back["materialized"] and back["written"]["rows"][features.ITEM_STATS_VIEW] == len(new_items)
        stamps = offline_tables.read_table(pg_url, schema, "item_stats")[S.EVENT_TIMESTAMP]
        assert (stamps == window_end - pd.Timedelta(seconds=1)).all()
        stats = pd.read_parquet(root / "data" / "item_stats.parquet").set_index(S.ITEM_ID)
        online_items = features.online_item_stats(features.get_store(cfg, name), all_items)
        assert {i: online_items[i][S.POPULARITY] for i in all_items} == stats[S.POPULARITY].to_dict()

    finally:
        features.teardown(cfg, name)


def test_a_relative_learn_home_gives_absolute_store_paths(tmp_path, monkeypatch):
    """Feast joins a relative registry path to the repo path: the store's paths must be absolute."""
    from learn_tasks.config import load_settings
    from learn_tasks.online import feast_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEARN_HOME", "relative-home")
    conf = feast_config.repo_config(load_settings(), "synth")
    registry = conf.registry if isinstance(conf.registry, str) else conf.registry.path
    assert Path(registry).is_absolute() and Path(registry).is_relative_to(tmp_path / "relative-home")
    assert Path(conf.online_store.path).is_absolute()


@pytest.mark.integration
@pytest.mark.parametrize("checks", [False, True])
def test_feast_is_imported_without_typeguard_instrumentation_unless_asked(tmp_path, checks: bool) -> None:
    """``features.feast_type_checks`` off: Feast's classes are not instrumented (their constructors are Feast's
    own code objects) and other packages' ``@typechecked`` still checks; on: Feast keeps its checks."""
    script = textwrap.dedent("""
        import json, os, sys
        import typeguard
        from learn_tasks.config import load_settings
        from learn_tasks.online import feast_config

        feast_config.import_feast(load_settings())
        import feast.feature_view as fv

        @typeguard.typechecked
        def takes_int(x: int) -> int:
            return x

        try:
            takes_int("not an int")
            others_checked = False
        except typeguard.TypeCheckError:
            others_checked = True
        code = fv.FeatureView.__init__.__code__
        instrumented = any("typeguard" in str(c) for c in (*code.co_names, *code.co_consts))
        print(json.dumps({"instrumented": instrumented, "others_checked": others_checked,
                          "restored": typeguard.typechecked is not feast_config._unchecked}))
    """)
    env = {**os.environ, "LEARN_HOME": str(tmp_path), "LEARN_FEATURES__FEAST_TYPE_CHECKS": str(checks).lower()}
    path = tmp_path / "probe.py"  # a file: typeguard reads the source of what it instruments
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"instrumented": checks, "others_checked": True, "restored": True}


@pytest.mark.integration
def test_the_embedded_stack_loads_no_postgresql_driver_and_no_scipy() -> None:
    """Every `learn run` task and the service import these modules: the file offline store needs neither
    psycopg (PostgreSQL offline tables) nor scipy (the item-kNN baseline), so neither is loaded with them."""
    probe = ("import json, sys; import learn_tasks.orchestration.tasks, learn_tasks.online.service; "
             "print(json.dumps(sorted(m for m in ('psycopg', 'psycopg2', 'scipy') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
