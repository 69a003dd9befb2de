"""Live traffic in monitoring, and new items findable with the default model (learn_hybrid).

One home per module, built as `make run` builds it (generated data, temporal split, content embeddings, the
default model kind trained briefly, evaluated, indexed with the default index settings and released),
then the real service (FastAPI TestClient) answers requests, events and new items, written to the real
event and served logs. The monitor then reports that traffic, and every panel of the dashboard has a value.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.config import load_settings
from learn_tasks.data import datasets as data
from learn_tasks.monitoring import online
from learn_tasks.pch import model as M

TOKEN = "test-token-online"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------- plain functions
def test_seed_query_undoes_the_evidence_weights() -> None:
    rng = np.random.default_rng(0)
    v, v2 = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(2))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v2 /= np.linalg.norm(v2, axis=1, keepdims=True)
    w = np.array([[0.99], [0.3], [0.0]], np.float32)
    stored = np.concatenate([w * v, (1 - w) * v2], 1)
    q = M.seed_query(stored, 8)
    np.testing.assert_allclose(q[:2], np.concatenate([v, v2], 1)[:2], atol=1e-5)
    np.testing.assert_allclose(q[2], np.concatenate([v2[2], v2[2]]), atol=1e-6)  # no evidence: v = v'
    # A popular seed (w = 0.99) and an item with its text but no evidence ([0, v']): the stored seed
    # scores it (1 - w) = 0.01; the seed query scores it 1, the most any item can score.
    new = np.concatenate([np.zeros(8, np.float32), v2[0]])
    assert stored[0] @ new == pytest.approx(0.01, abs=1e-4)
    assert q[0] @ new == pytest.approx(1.0, abs=1e-5)


def _traffic(served: list[tuple], events: list[tuple], items: list[tuple]) -> online.Traffic:
    t0 = pd.Timestamp("2024-05-01T12:00:00Z")

    def at(s: float) -> pd.Timestamp:
        return t0 + pd.Timedelta(seconds=s)

    sv = pd.DataFrame([{S.USER_ID: u, "strategy": st, "item_ids": ids, S.IS_COLD_START: cs,
                        S.IS_LONG_TAIL: lt, "latency_ms": ms, "logged_at": at(s)}
                       for s, u, st, ids, cs, lt, ms in served])
    ev = pd.DataFrame([{S.USER_ID: u, S.ITEM_ID: i, "logged_at": at(s)} for s, u, i in events],
                      columns=[S.USER_ID, S.ITEM_ID, "logged_at"])
    it = pd.DataFrame([{S.ITEM_ID: i, "logged_at": at(s)} for s, i in items], columns=[S.ITEM_ID, "logged_at"])
    return online.Traffic(sv, ev, it, t0, at(3600))


def test_served_frame_hits_exposure_and_first_impressions() -> None:
    t = _traffic(
        served=[(10, 1, "personalized", [5, 6], [False, True], [True, False], 3.0),
                (20, 2, "popular", [7, 8], [False, False], [False, False], 5.0),
                (30, 1, "content_based_seed", [9, 100], [False, True], [False, False], 9.0)],
        events=[(5, 1, 5),     # before the first response: not a hit
                (15, 1, 6),    # after it, a served item: a hit
                (25, 2, 5),    # user 2 was not served item 5
                (40, 1, 9)],   # after the third response: a hit
        items=[(12, 100), (50, 101)])
    f = online.served_frame(t)
    assert f["hit"].tolist() == [1.0, 0.0, 1.0]
    assert f["is_fallback"].tolist() == [0.0, 1.0, 1.0]
    assert f["cold_start_exposure"].tolist() == [0.5, 0.0, 0.5]
    assert f["long_tail_exposure"].tolist() == [0.5, 0.0, 0.0]
    tti = online.first_impressions(t)
    assert tti[100] == pytest.approx(18.0) and np.isnan(tti[101])
    values = online.online_values(t, None)
    assert values["online.requests"] == 3 and values["online.events"] == 4 and values["online.users"] == 2
    assert values["online.new_items"] == 2 and values["online.new_items_served"] == 1
    assert values["online.new_item_first_impression_s_max"] == pytest.approx(18.0)


# ------------------------------------------------------------------------------------- a served home
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    """Generated data -> encode -> learn_hybrid (the default kind), temporal split -> evaluation -> index with
    the default index settings -> release -> the service app (once per module)."""
    from fastapi.testclient import TestClient

    from learn_tasks.ceg import encode
    from learn_tasks.data import synth
    from learn_tasks.evaluation import harness
    from learn_tasks.online import features, index
    from learn_tasks.online import service as serve
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    root = tmp_path_factory.mktemp("online") / "learn_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEARN_HOME", str(root))
    mp.setenv("LEARN_API_TOKEN", TOKEN)
    cfg = load_settings(overrides=["features.recent_items=20", "train.val_users=50", "eventlog.served_flush_s=0.05",
                                   "monitor.embedding_min_items=2", "monitor.min_rows=5"])
    assert cfg.pipeline.model == "learn_hybrid"
    src = synth.write_seqrec(root.parent / "src", synth.SynthSpec(n_users=150, n_items=200))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    encode.encode_catalogue(cfg, "synth")
    run = train.train_model(cfg, "synth", protocol=S.PROTOCOL_TEMPORAL, epochs=2)
    run_dir = Path(run["run_dir"])
    harness.evaluate_run(cfg, "synth", S.PROTOCOL_TEMPORAL, model="learn_hybrid", run_dir=run_dir, stage=S.TEST)
    registry.promote(cfg, "synth", run_dir)
    features.materialize_features(cfg, "synth")
    built = index.index_catalogue(cfg, "synth")
    app = serve.create_app(cfg, "synth")
    client = TestClient(app, raise_server_exceptions=False)
    yield {"cfg": cfg, "client": client, "app": app, "rec": app.state.recommender, "index": built,
           "run_dir": run_dir}
    client.close()
    app.state.served_log.close()
    index.close(cfg)
    mp.undo()


def _new_edition(c, rec, seed: int) -> int:
    """POST /items with the text of catalogue item ``seed``; returns the new item's id."""
    items = data.load_items(rec.cfg, "synth").set_index(S.ITEM_ID)
    row = items.loc[seed]
    body = {f: str(row[f]) for f in (S.TITLE, S.CATEGORY, S.BRAND, S.DESCRIPTION) if f in row and pd.notna(row[f])}
    r = c.post("/items", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return int(r.json()[S.ITEM_ID])


@pytest.mark.integration
def test_new_items_findable_with_the_default_model(home) -> None:
    c, rec = home["client"], home["rec"]
    assert rec.bundle.net.config.mix_k > 0  # the default model stores evidence-weighted, 2x-wide vectors
    assert home["index"]["index_type"] == "FLAT" and home["index"]["index_recall_at_10"] >= 0.99
    seeds = [int(p[S.ITEM_ID]) for p in rec.popular[:3]]  # popular seeds: weights near 1, the hard case
    for seed in seeds:
        new = _new_edition(c, rec, seed)
        got = c.get(f"/recommendations/{10**15 + seed}", params={"k": 10, "seed_item": seed}).json()
        assert got["strategy"] == "content_based_seed"
        assert new in [i[S.ITEM_ID] for i in got["items"]], (seed, new, got["items"])
        # The cause: searching with the stored (weighted) seed vector ranks the new item about last.
        stored = rec._item_vector(seed)
        plain = [h[S.ITEM_ID] for h in rec._search(stored, 10, {seed})]
        assert new not in plain


@pytest.mark.integration
def test_monitor_reports_live_traffic_and_every_panel_has_a_value(home) -> None:
    from learn_tasks.monitoring.dashboard import load_dashboard_spec
    from learn_tasks.monitoring.monitor import monitor_window
    from learn_tasks.monitoring.quality import tracked_model

    cfg, c, rec = home["cfg"], home["client"], home["rec"]
    inter = data.load_interactions(cfg, "synth")
    users = inter[S.USER_ID].unique()[:12].tolist()
    start = pd.Timestamp.now(tz="UTC")  # this test's traffic only (the other test's requests are earlier)
    served = {}
    for u in users:
        r = c.get(f"/recommendations/{u}", params={"k": 10})
        assert r.status_code == 200, r.text
        served[u] = [i[S.ITEM_ID] for i in r.json()["items"]]
    for u in (10**12, 10**12 + 1):  # unknown users: popular fallback
        assert c.get(f"/recommendations/{u}", params={"k": 10}).json()["fallback"]
    new = _new_edition(c, rec, int(rec.popular[5][S.ITEM_ID]))
    got = c.get(f"/recommendations/{10**12 + 2}", params={"k": 10, "seed_item": int(rec.popular[5][S.ITEM_ID])})
    assert new in [i[S.ITEM_ID] for i in got.json()["items"]]
    evs = [{"user_id": u, "item_id": served[u][0], "event_id": f"mon-{u}"} for u in users[:6]]
    r = c.post("/events", json={"events": evs}, headers=AUTH)
    assert r.status_code == 202 and r.json()["accepted"] == 6, r.text
    home["app"].state.served_log.flush()

    assert tracked_model(cfg, "synth") == "learn_hybrid"
    res = monitor_window(cfg, "synth", run_id="online-1", run_date="2024-05-02", online_start=start)
    v = res["values"]
    assert v["online.requests"] == len(users) + 3 and v["online.events"] == 6
    assert v["online.hit_rate"] == pytest.approx(6 / (len(users) + 3))
    assert v["online.fallback_share"] == pytest.approx(3 / (len(users) + 3))
    assert v["online.new_items_served"] >= 1 and v["online.new_item_first_impression_s_max"] >= 0
    assert v["online.latency_ms_p99"] >= v["online.latency_ms_p50"] > 0
    assert "online" in res["sections"] and res["window"]["online"]
    # the quality values are the released run's own evaluation
    assert Path(res["evaluation"]).parent.joinpath("metrics.json").exists()
    from learn_tasks.storage import read_json
    assert Path(read_json(res["evaluation"])["meta"]["run_dir"]).name == home["run_dir"].name

    # every series panel of the dashboard has at least one value in the run's summary snapshot
    have = set(v) | set(res["thresholds"])
    k = cfg.monitor.exposure_k
    empty = []
    for tab in load_dashboard_spec()["tabs"]:
        for p in tab["panels"]:
            keys = [s["value"].replace("{k}", str(k)) for s in p.get("series", [])]
            if keys and not any(key in have for key in keys):
                empty.append(f"{tab['title']} / {p['title']}: {keys}")
    assert not empty, (empty, res["notes"])
    # a threshold on live traffic alerts like any other
    strict = cfg.with_overrides(monitor={"online_fallback_share_max": 0.01})
    again = monitor_window(strict, "synth", run_id="online-2", run_date="2024-05-02", online_start=start)
    assert any(a["slice"] == "online" and a["metric"] == "fallback_share" for a in again["alerts"])
