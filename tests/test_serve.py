"""The recommendation service: ranking functions without HTTP, then the FastAPI app over real embedded
Feast (SQLite) and Milvus Lite with a model trained for one epoch on generated data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learn_tasks import schema as S
from learn_tasks.data import datasets as data
from learn_tasks.online import index, recommender
from learn_tasks.online import service as serve
from learn_tasks.online.bundle import usable_history
from learn_tasks.online.replica import Replica
from learn_tasks.config import Settings, load_settings

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------- plain functions
def test_rank_excludes_dedups_and_orders() -> None:
    cands = [{S.ITEM_ID: 1, "score": 0.5}, {S.ITEM_ID: 2, "score": 0.9}, {S.ITEM_ID: 3, "score": 0.9},
             {S.ITEM_ID: 2, "score": 0.1}, {S.ITEM_ID: 4, "score": 0.7}]
    assert [c[S.ITEM_ID] for c in recommender.rank(cands, exclude={4}, k=3)] == [2, 3, 1]  # ties by id
    assert recommender.rank(cands, exclude={1, 2, 3, 4}, k=3) == []


def test_fallback_and_history_helpers() -> None:
    popular = [{S.ITEM_ID: i, "score": 10 - i} for i in range(5)]
    assert [p[S.ITEM_ID] for p in recommender.popular_fallback(popular, exclude={0, 2}, k=2)] == [1, 3]
    known = {1, 2, 3, 5}.__contains__
    assert usable_history([9, 1, 2, 9, 3, 5], known, max_len=3) == [2, 3, 5]  # unknown dropped, last 3
    assert usable_history(None, known, max_len=3) == []


def test_replica_matches_exact_search_and_upserts() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    rows = index.ItemRows(item_ids=np.arange(50) + 1000, vectors=v, popularity=np.arange(50))
    rep = Replica(rows)
    q = rng.normal(size=8).astype(np.float32)
    exact, _ = index.exact_topk(v, q[None], k=5, exclude=[{1003}], item_ids=rows.item_ids)
    assert [h[S.ITEM_ID] for h in rep.search(q, 5, {1003})] == (rows.item_ids[exact[0]]).tolist()
    rep.upsert(index.ItemRows(item_ids=[7], vectors=q[None] * 10, titles=["new"]))
    top = rep.search(q, 1, set())[0]
    assert top[S.ITEM_ID] == 7 and top[S.TITLE] == "new" and top[S.IS_COLD_START] and len(rep) == 51


def test_replica_breaks_ties_by_item_id_and_handles_small_catalogues() -> None:
    # Three items with the same vector: equal scores, so the order is by item id whatever the row order.
    v = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    rep = Replica(index.ItemRows(item_ids=np.array([30, 10, 5, 20]), vectors=v))
    q = np.array([1.0, 0.0], np.float32)
    assert [h[S.ITEM_ID] for h in rep.search(q, 2, set())] == [10, 20]
    assert [h[S.ITEM_ID] for h in rep.search(q, 10, {20})] == [10, 30, 5]  # k above the size: all but excluded
    assert rep.search(q, 10, {5, 10, 20, 30}) == []
    assert rep.search(np.array([np.nan, 0.0], np.float32), 2, set()) == []  # NaN scores never rank


def test_no_promoted_model_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(recommender.ServeError, match="no promoted model"):
        recommender.Recommender(settings, "synth")


# ------------------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Generated data -> encode -> train 1 epoch -> promote -> Feast -> Milvus Lite -> app (once per module)."""
    from learn_tasks.ceg import encode
    from learn_tasks.online import features
    from learn_tasks.pch import registry
    from learn_tasks.data import synth
    from learn_tasks.training import train

    home = tmp_path_factory.mktemp("serve") / "learn_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEARN_HOME", str(home))
    mp.setenv("LEARN_API_TOKEN", TOKEN)
    cfg = load_settings(overrides=["index.index_type=FLAT", "features.recent_items=20", "train.val_users=50"])
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=120, n_items=200))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    encode.encode_catalogue(cfg, "synth")
    run = train.train_model(cfg, "synth", model="learn", epochs=1)
    registry.promote(cfg, "synth", Path(run["run_dir"]))
    features.materialize_features(cfg, "synth")
    built = index.index_catalogue(cfg, "synth")
    app = serve.create_app(cfg, "synth")
    from fastapi.testclient import TestClient

    client = TestClient(app, raise_server_exceptions=False)  # a 500 must show up as a 500, not an exception
    yield {"cfg": cfg, "client": client, "rec": app.state.recommender, "index": built}
    client.close()
    index.close(cfg)
    mp.undo()


def _known_user(served) -> int:
    inter = data.load_interactions(served["cfg"], "synth")
    return int(inter[S.USER_ID].iloc[0])


@pytest.mark.integration
def test_recommend_without_http_matches_exact_search(served) -> None:
    rec: recommender.Recommender = served["rec"]
    user = _known_user(served)
    out = rec.recommend(user, k=10)
    assert out["strategy"] == "personalized" and not out["fallback"] and len(out["items"]) == 10
    # The same answer computed by hand: Feast history -> user tower -> exact search minus seen items.
    feats = rec.online_features(user)
    hist = usable_history(feats[S.RECENT_ITEM_IDS], rec.bundle.knows, rec.bundle.max_len)
    uvec = rec.bundle.user_vectors([hist])[0]
    everything = index.fetch_all(rec.client, rec.collection)
    rows, _ = index.exact_topk(everything.vectors, uvec[None], 10, exclude=[set(feats[S.RECENT_ITEM_IDS])],
                               item_ids=everything.item_ids)
    assert [i[S.ITEM_ID] for i in out["items"]] == everything.item_ids[rows[0]].tolist()
    assert served["index"]["index_recall_at_10"] == 1.0


@pytest.mark.integration
def test_happy_path_over_http(served) -> None:
    c = served["client"]
    user = _known_user(served)
    r = c.get(f"/recommendations/{user}", params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strategy"] == "personalized" and body["history_length"] > 0 and len(body["items"]) == 5
    seen = set(served["rec"].online_features(user)[S.RECENT_ITEM_IDS])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    for item in body["items"]:
        assert item[S.ITEM_ID] not in seen and item[S.TITLE]
        assert isinstance(item[S.IS_COLD_START], bool) and isinstance(item[S.IS_LONG_TAIL], bool)
    assert c.get("/health").json()["status"] == "ok"
    metrics = c.get("/metrics").text
    assert 'learn_http_requests_total{endpoint="/recommendations/{user_id}",status="200"}' in metrics
    assert 'learn_recommendations_total{strategy="personalized"}' in metrics
    assert "/recommendations/{user_id}" in c.get("/openapi.json").json()["paths"]


@pytest.mark.integration
def test_unknown_user_gets_labelled_fallbacks(served) -> None:
    c = served["client"]
    popular = c.get("/recommendations/987654321", params={"k": 3}).json()
    assert popular["strategy"] == "popular" and popular["fallback"] and popular["reason"] == "unknown user"
    pops = [i["score"] for i in popular["items"]]
    assert len(pops) == 3 and pops == sorted(pops, reverse=True)
    seed = served["rec"].popular[0][S.ITEM_ID]
    similar = c.get("/recommendations/987654321", params={"k": 3, "seed_item": seed}).json()
    assert similar["strategy"] == "content_based_seed" and similar["fallback"]
    assert seed not in [i[S.ITEM_ID] for i in similar["items"]] and len(similar["items"]) == 3
    assert c.get("/recommendations/987654321", params={"seed_item": 10**12}).status_code == 404


@pytest.mark.integration
def test_bad_input_is_4xx_never_500(served) -> None:
    c = served["client"]
    for url in ("/recommendations/abc", "/recommendations/-1", "/recommendations/1?k=0",
                "/recommendations/1?k=100000", f"/recommendations/{2**64}", "/recommendations/1?seed_item=x"):
        assert c.get(url).status_code == 422, url
    assert c.post("/items", json={"title": "   "}, headers=AUTH).status_code == 422
    assert c.post("/items", json={"title": "ok", "colour": "red"}, headers=AUTH).status_code == 422
    assert c.post("/items", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}).status_code == 422
    assert c.post("/items", json={"item_id": -5, "title": "x"}, headers=AUTH).status_code == 422
    assert c.post("/events", json={"user_id": 1}, headers=AUTH).status_code == 422
    assert c.post("/events", json={"user_id": 1, "item_id": 10**15}, headers=AUTH).status_code == 404
    assert c.post("/events", json={"user_id": 1, "item_id": 100, "event_timestamp": "yesterday"},
                  headers=AUTH).status_code == 422
    existing = served["rec"].popular[0][S.ITEM_ID]
    assert c.post("/items", json={"item_id": existing, "title": "dup"}, headers=AUTH).status_code == 409


@pytest.mark.integration
def test_write_endpoints_require_the_token(served, monkeypatch: pytest.MonkeyPatch) -> None:
    c = served["client"]
    for path, body in (("/items", {"title": "Secret Book"}), ("/events", {"user_id": 1, "item_id": 100})):
        assert c.post(path, json=body).status_code == 401
        assert c.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post(path, json=body, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
    # A service started without a token refuses every write.
    from fastapi.testclient import TestClient

    monkeypatch.delenv("LEARN_API_TOKEN")
    locked = TestClient(serve.create_app(served["cfg"], recommender=served["rec"]))
    assert locked.post("/items", json={"title": "x"}, headers=AUTH).status_code == 503


@pytest.mark.integration
def test_new_item_is_recommendable_at_once_and_events_count(served) -> None:
    c = served["client"]
    rec: recommender.Recommender = served["rec"]
    seed = rec.popular[0][S.ITEM_ID]
    title = rec.titles[seed]
    r = c.post("/items", json={"title": title, "category": "Books"}, headers=AUTH)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["recommendable"] and new[S.IS_COLD_START] and new["time_to_recommendable_s"] > 0
    # Same text as the seed -> nearly the same item vector: it is the seed's nearest neighbour now.
    similar = c.get("/recommendations/555555555", params={"k": 5, "seed_item": seed}).json()
    top = similar["items"][0]
    assert top[S.ITEM_ID] == new[S.ITEM_ID] and top[S.IS_COLD_START] and top[S.TITLE] == title

    # An event makes an unknown user personalised on the next request, and excludes what they saw.
    user = 777_777
    e = c.post("/events", json={"user_id": user, "item_id": new[S.ITEM_ID]}, headers=AUTH)
    assert e.status_code == 202 and e.json()["history_length"] == 1
    after = c.get(f"/recommendations/{user}", params={"k": 5}).json()
    assert after["strategy"] == "personalized" and after["history_length"] == 1
    assert new[S.ITEM_ID] not in [i[S.ITEM_ID] for i in after["items"]]

    # A restarted service still knows the item (persisted, restored into its replica).
    again = recommender.Recommender(served["cfg"], "synth", load_encoder=False)
    try:
        assert again.replica is not None and new[S.ITEM_ID] in again.replica and again.new_items >= 1
        assert again.recommend(user, k=3)["strategy"] == "personalized"
    finally:
        again.close()  # its replica watcher would outlive the test's Milvus client


@pytest.mark.integration
def test_replica_picks_up_items_other_processes_upsert(served) -> None:
    rec: recommender.Recommender = served["rec"]
    assert rec.refresh_replica() is False  # in step: nothing to reload
    probe = np.zeros((1, rec.replica.vectors.shape[1]), np.float32)
    probe[0, 0] = 1.0
    index.upsert(served["cfg"], "synth", index.ItemRows(item_ids=[9_000_001], vectors=probe, titles=["ingested"]),
                 target=rec.collection, client=rec.client)  # as the item-ingest task does
    assert rec.refresh_replica() is True and 9_000_001 in rec.replica
    assert rec.health()["replica_reloads"] >= 1
