"""Milvus item index: exact search and recall (pure), then real Milvus Lite: alias swap, keep-N, rollback,
upsert, recall check, a clear error when the data is locked, and the shared local server."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from learn_tasks import schema as S
from learn_tasks.online import index, index_rows
from learn_tasks.online import milvus_server
from learn_tasks.online.milvus_server import IndexLockedError, IndexStoreError
from learn_tasks.config import Settings

from helpers import free_port


def unit(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(n: int = 400, seed: int = 0, first_id: int = 100) -> index.ItemRows:
    return index.ItemRows(item_ids=np.arange(first_id, first_id + n), vectors=unit(n, seed=seed),
                          popularity=np.arange(n) % 7, titles=[f"item {i}" for i in range(n)])


# ------------------------------------------------------------------------------------- pure functions
def test_exact_topk_and_recall_by_hand() -> None:
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
    r, s = index.exact_topk(vectors, np.array([[1, 0]], np.float32), k=3)
    assert r.tolist() == [[0, 2, 1]] and np.allclose(s, [[1.0, 0.6, 0.0]])
    ids = np.array([10, 11, 12, 13])
    r, _ = index.exact_topk(vectors, np.array([[1, 0]], np.float32), k=5, exclude=[{10}], item_ids=ids)
    assert r.tolist() == [[2, 1, 3, -1, -1]]  # excluded item gone, padding at the end
    assert index.recall_at_k([[1, 2, 3]], [[3, 2, 9]], k=3) == pytest.approx(2 / 3)
    assert index.recall_at_k([[1, 2], [5, 6]], [[1, 2], [7, 8]], k=2) == pytest.approx(0.5)


def test_item_rows_validation_and_names() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        index.ItemRows(item_ids=[1, 1], vectors=unit(2))
    bad = unit(2)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite vectors for item_ids \[2\]"):
        index.ItemRows(item_ids=[1, 2], vectors=bad)
    r = index.ItemRows(item_ids=[1, 2], vectors=unit(2), popularity=[0, 3])
    assert r.is_cold_start.tolist() == [True, False]  # cold-start defaults to "no interactions"
    assert index.collection_name("amazon-books", "20250101T000000-learn-ab12") == \
        "items__amazon_books__20250101T000000_learn_ab12"


# ------------------------------------------------------------------------------------- Milvus Lite
@pytest.mark.integration
def test_alias_swap_keep_versions_rollback_upsert(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = settings.with_overrides(index={"keep_versions": 2, "index_type": "HNSW", "flat_max_rows": None,
                                            "recall_queries": 64})
    try:
        first = index.build(cfg, "books", "v1", rows(seed=1))
        assert first["previous"] is None and index.current(cfg, "books") == index.collection_name("books", "v1")
        assert first["index_recall_at_10"] >= 0.9  # HNSW against exact numpy search
        second = index.build(cfg, "books", "v2", rows(seed=2))
        assert second["previous"] == first["collection"]
        assert index.current(cfg, "books") == second["collection"]
        third = index.build(cfg, "books", "v3", rows(seed=3))
        assert third["dropped"] == [first["collection"]]  # keep 2: v1 goes, v2 stays for rollback
        assert [v["version"] for v in index.versions(cfg, "books")] == ["v2", "v3"]

        back = index.rollback(cfg, "books")
        assert (back["from"], back["to"]) == (third["collection"], second["collection"])
        client = index.connect(cfg)
        alias = index.alias_name(cfg, "books")
        q = rows(seed=2).vectors[:1]
        assert index.search(client, alias, q, 1)[0][0][S.ITEM_ID] == 100  # v2's vectors answer now
        with pytest.raises(IndexStoreError, match="nothing to roll back"):
            index.rollback(cfg, "books")
        index.rollback(cfg, "books", to="v3")
        assert index.current(cfg, "books") == third["collection"]

        # Rebuilding the same version reuses the complete collection.
        assert index.build(cfg, "books", "v3", rows(seed=3))["reused"]

        # An upsert is searchable as soon as it returns, through the alias.
        probe = unit(1, seed=99)
        new = index.ItemRows(item_ids=[99_999], vectors=probe, titles=["brand new"])
        index.upsert(cfg, "books", new)
        hit = index.search(client, alias, probe, 3)[0][0]
        assert hit[S.ITEM_ID] == 99_999 and hit[S.TITLE] == "brand new" and hit[S.IS_COLD_START] is True
        # Exclusions are applied inside Milvus, so k results still come back.
        got = index.search(client, alias, probe, 3, exclude=[[99_999]])[0]
        assert len(got) == 3 and 99_999 not in [h[S.ITEM_ID] for h in got]

        fetched = index.fetch_all(client, third["collection"])
        assert len(fetched) == 401 and fetched.item_ids[-1] == 99_999
        assert np.allclose(fetched.vectors[0], rows(seed=3).vectors[0], atol=1e-6)
        # Read by ranges cut at the ids a caller expects: still every row, unexpected ones (99_999, below the
        # first expected id) included, the same values as the iterator's.
        expected = np.arange(150, 500, 3)
        assert len(index_rows.fetch_ranges(client, third["collection"], expected, 32, [S.ITEM_ID])) == 401
        ranged = index.fetch_all(client, third["collection"], batch=16, expected_ids=expected)
        assert np.array_equal(ranged.item_ids, fetched.item_ids) and np.array_equal(ranged.vectors, fetched.vectors)
        assert ranged.titles == fetched.titles and np.array_equal(ranged.popularity, fetched.popularity)
        # A range that reaches Milvus' result limit may be cut short: the iterator reads the collection then.
        monkeypatch.setattr(index_rows, "RANGE_ROWS_MAX", 40)
        assert index_rows.fetch_ranges(client, third["collection"], expected, 32, [S.ITEM_ID]) is None
        fallback = index.fetch_all(client, third["collection"], batch=16, expected_ids=expected, vectors_only=True)
        assert np.array_equal(fallback.item_ids, fetched.item_ids)

        from learn_tasks.cli import app

        res = CliRunner().invoke(app, ["index", "list", "--dataset", "books", "--json"])
        assert res.exit_code == 0, res.output
        assert '"current": true' in res.output
    finally:
        index.close(cfg)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_locked_lite_data_gives_a_clear_error(settings: Settings) -> None:
    home = settings.home
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["LEARN_HOME"] = {home!r}
        from learn_tasks.online import index
        from learn_tasks.config import load_settings
        index.connect(load_settings())
        print("ready", flush=True)
        sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(IndexLockedError, match="learn index server start"):
            index.connect(settings)
    finally:
        holder.stdin.close()
        holder.wait(60)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_local_server_is_shared_by_processes(settings: Settings) -> None:
    cfg = settings.with_overrides(index={"server_port": free_port(), "index_type": "FLAT"})
    started = milvus_server.start(cfg)
    try:
        assert started["running"] and milvus_server.start(cfg)["started"] is False  # idempotent
        uri, _, kind = index.resolve_uri(cfg)
        assert kind == "lite-server" and uri == started["uri"]
        built = index.build(cfg, "books", "v1", rows(n=50))
        assert built["uri_kind"] == "lite-server" and built["index_recall_at_10"] == 1.0
        # Another process reads the same index at the same time, through the server.
        code = textwrap.dedent(f"""
            import os
            os.environ["LEARN_HOME"] = {settings.home!r}
            os.environ["LEARN_INDEX__SERVER_PORT"] = "{cfg.index.server_port}"
            from learn_tasks.online import index
            from learn_tasks.config import load_settings
            print(index.current(load_settings(), "books"))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == built["collection"], out.stderr[-2000:]
    finally:
        index.close(cfg)
        stopped = milvus_server.stop(cfg)
    assert stopped["stopped"] and not milvus_server.status(cfg)["running"]
    assert index.resolve_uri(cfg)[2] == "lite"


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_new_client_after_an_idle_while_reaches_the_local_server(settings: Settings) -> None:
    """pymilvus keeps one connection per server in a process and hands it to the next client. The Milvus Lite
    server drops a connection that pings while idle; the next client (a pipeline task after another one
    closed its client, in the same process) must still connect."""
    cfg = settings.with_overrides(index={"server_port": free_port(), "index_type": "FLAT"})
    milvus_server.start(cfg)
    try:
        built = index.build(cfg, "books", "v1", rows(n=20))
        index.close(cfg)  # as load_milvus and upsert_items end
        time.sleep(40)  # longer than pymilvus' idle check (30 s) and three of its 10 s keepalive pings
        assert index.current(cfg, "books") == built["collection"]
    finally:
        index.close(cfg)
        milvus_server.stop(cfg)
