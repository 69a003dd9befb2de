"""The service's side of the loop: POST /events (checked, logged before the answer, idempotent, then in
the online features, same-second and late events included), the served-recommendation log, POST /items
saved in the log with sequence ids, and recovery after a crash (items saved but not indexed, events
logged but not applied online). Real embedded Feast (SQLite), Milvus Lite and a one-epoch model; the
Redis online store is tested for real in the production-marked test at the end."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.config import Settings, load_settings
from learn_tasks.data import datasets as data
from learn_tasks.data import eventlog as L
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.online import bundle, events, features, index, recommender, updates
from learn_tasks.online import service as serve

TOKEN = "test-token-events"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------- plain functions
def test_check_event_reasons() -> None:
    now = L.to_us("2024-05-01T12:00:00Z")
    known = {10, 11}.__contains__

    def check(raw):
        return events.check_event(0, raw, now, 300.0, known)

    ok = check({"user_id": 1, "item_id": 10, "event_timestamp": "2024-05-01T11:00:00Z", "event_id": "x-1"})
    assert ok == L.Event("x-1", 1, 10, L.to_us("2024-05-01T11:00:00Z"), True)
    default = check({"user_id": 1, "item_id": 10})
    assert default.event_us == now and not default.timed and len(default.event_id) == 32
    assert check({"user_id": 1, "item_id": 10, "event_timestamp": 1714561200}).event_us == 1714561200 * 10**6
    assert check({"user_id": 1, "item_id": 10, "event_timestamp": "2024-05-01 12:04:00"}).event_us == now + 240 * 10**6
    reasons = {
        "user_id must be an integer": [{"item_id": 10}, {"user_id": "1", "item_id": 10}, {"user_id": True, "item_id": 10},
                                       {"user_id": -1, "item_id": 10}, {"user_id": 2**63, "item_id": 10}],
        "item_id must be an integer": [{"user_id": 1, "item_id": 1.5}],
        "not in the catalogue": [{"user_id": 1, "item_id": 12}],
        "in the future": [{"user_id": 1, "item_id": 10, "event_timestamp": "2024-05-01T12:06:00Z"}],
        "ISO 8601 or unix seconds": [{"user_id": 1, "item_id": 10, "event_timestamp": "yesterday"},
                                     {"user_id": 1, "item_id": 10, "event_timestamp": "1960-01-01"}],
        "event_id must be": [{"user_id": 1, "item_id": 10, "event_id": ""}, {"user_id": 1, "item_id": 10, "event_id": 5},
                             {"user_id": 1, "item_id": 10, "event_id": "x" * 129}, {"user_id": 1, "item_id": 10, "event_id": "a b"}],
        "unknown field(s) colour": [{"user_id": 1, "item_id": 10, "colour": "red"}],
        "a JSON object": [[1, 10], "event"],
    }
    for reason, raws in reasons.items():
        for raw in raws:
            got = check(raw)
            assert isinstance(got, events.Rejected) and reason in got.reason, (raw, got)
    assert check({"user_id": 1, "item_id": 12}).kind == events.UNKNOWN_ITEM


def test_apply_events_same_second_and_late() -> None:
    cur = {S.RECENT_ITEM_IDS: [1, 2], S.RECENT_TIMESTAMPS: [100, 200], S.EVENT_COUNT: 2, S.DISTINCT_ITEMS: 2,
           S.FIRST_SEEN: 100, S.LAST_SEEN: 200}
    new = updates.apply_events(cur, [(3, 200), (4, 200), (5, 150)], recent=10)
    assert new[S.RECENT_ITEM_IDS] == [1, 5, 2, 3, 4] and new[S.RECENT_TIMESTAMPS] == [100, 150, 200, 200, 200]
    assert (new[S.EVENT_COUNT], new[S.DISTINCT_ITEMS], new[S.FIRST_SEEN], new[S.LAST_SEEN]) == (5, 5, 100, 200)
    assert updates.apply_events(None, [(7, 50)], recent=3)[S.FIRST_SEEN] == 50


def test_redis_connection_string() -> None:
    assert updates.redis_params("127.0.0.1:6379") == {"host": "127.0.0.1", "port": 6379}
    assert updates.redis_params("redis:6380,db=2,password=s3cret,ssl=true") == {
        "host": "redis", "port": 6380, "db": 2, "password": "s3cret", "ssl": True}


# ------------------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    """Generated data -> encode -> train 1 epoch -> promote -> Feast -> Milvus Lite -> app (once per module)."""
    from learn_tasks.ceg import encode
    from learn_tasks.data import synth
    from learn_tasks.pch import registry
    from learn_tasks.training import train
    from fastapi.testclient import TestClient

    home = tmp_path_factory.mktemp("events") / "learn_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEARN_HOME", str(home))
    mp.setenv("LEARN_API_TOKEN", TOKEN)
    cfg = load_settings(overrides=["index.index_type=FLAT", "features.recent_items=20", "train.val_users=50",
                                   "eventlog.served_flush_s=0.05", "eventlog.max_batch=20"])
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=120, n_items=200))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    encode.encode_catalogue(cfg, "synth")
    run = train.train_model(cfg, "synth", epochs=1)
    registry.promote(cfg, "synth", Path(run["run_dir"]))
    features.materialize_features(cfg, "synth")
    index.index_catalogue(cfg, "synth")
    application = serve.create_app(cfg, "synth")
    client = TestClient(application, raise_server_exceptions=False)
    yield {"cfg": cfg, "client": client, "rec": application.state.recommender, "app": application}
    client.close()
    application.state.served_log.close()
    index.close(cfg)
    mp.undo()


def _user(app, i: int = 0) -> int:
    inter = data.load_interactions(app["cfg"], "synth")
    return int(inter[S.USER_ID].unique()[i])


@pytest.mark.integration
def test_events_contract_logged_before_the_answer_and_idempotent(app) -> None:
    c, rec = app["client"], app["rec"]
    user, item = _user(app, 1), rec.popular[0][S.ITEM_ID]
    before = rec.online_features(user)[S.EVENT_COUNT]
    r = c.post("/events", json={"user_id": user, "item_id": item, "event_id": "app-ev-1"}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert {k: body[k] for k in ("accepted", "duplicates", "rejected", "event_ids")} == {
        "accepted": 1, "duplicates": 0, "rejected": [], "event_ids": ["app-ev-1"]}
    assert body["recorded"] and body[S.EVENT_COUNT] == before + 1
    stored = rec.log.read("synth", L.EVENTS)
    assert stored[stored["event_id"] == "app-ev-1"][[S.USER_ID, S.ITEM_ID]].values.tolist() == [[user, item]]
    # The same event again: acknowledged as a duplicate, stored once, counted once.
    again = c.post("/events", json={"user_id": user, "item_id": item, "event_id": "app-ev-1"}, headers=AUTH).json()
    assert (again["accepted"], again["duplicates"], again["event_ids"]) == (0, 1, ["app-ev-1"])
    assert rec.online_features(user)[S.EVENT_COUNT] == before + 1
    assert (rec.log.read("synth", L.EVENTS)["event_id"] == "app-ev-1").sum() == 1
    # The same id for another event is a conflict (409), not a silent duplicate.
    clash = c.post("/events", json={"user_id": user + 1, "item_id": item, "event_id": "app-ev-1"}, headers=AUTH)
    assert clash.status_code == 409 and "already stored for another event" in clash.json()["detail"]


@pytest.mark.integration
def test_event_batch_accepts_some_and_says_why_it_rejects_others(app) -> None:
    c, rec = app["client"], app["rec"]
    user, item = _user(app, 2), rec.popular[1][S.ITEM_ID]
    future = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=2)).isoformat()
    batch = [{"user_id": user, "item_id": item, "event_id": "b-1"},
             {"user_id": user, "item_id": 10**12},
             {"user_id": "u-5", "item_id": item},
             {"user_id": user, "item_id": item, "event_timestamp": future},
             {"user_id": user, "item_id": item, "event_id": "b-1"},
             {"user_id": user, "item_id": item, "event_timestamp": "2020-01-01T00:00:00Z"}]
    r = c.post("/events", json={"events": batch}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["duplicates"]) == (2, 1)
    assert [x["index"] for x in body["rejected"]] == [1, 2, 3]
    reasons = [x["reason"] for x in body["rejected"]]
    assert "not in the catalogue" in reasons[0] and "user_id" in reasons[1] and "future" in reasons[2]
    assert body["event_ids"][:2] == ["b-1", "b-1"] and len(body["event_ids"]) == 3
    assert set(body) == {"accepted", "duplicates", "rejected", "event_ids"}
    # Bounded batches and well-formed bodies; single bad events keep their 4xx.
    assert c.post("/events", json={"events": [batch[0]] * 21}, headers=AUTH).status_code == 413
    assert c.post("/events", json={"events": batch[0]}, headers=AUTH).status_code == 422
    assert c.post("/events", json=[batch[0]], headers=AUTH).status_code == 422
    assert c.post("/events", json={"user_id": 1}, headers=AUTH).status_code == 422
    assert c.post("/events", json={"user_id": 1, "item_id": 10**15}, headers=AUTH).status_code == 404
    assert c.post("/events", json={"events": []}, headers=AUTH).json()["accepted"] == 0
    assert c.post("/events", json={"events": batch}).status_code == 401
    metrics = c.get("/metrics").text
    assert 'learn_events_total{outcome="rejected"}' in metrics


@pytest.mark.integration
def test_same_second_and_late_events_reach_the_online_features(app) -> None:
    c, rec = app["client"], app["rec"]
    user = 424_242  # a new user: no history yet
    items = [p[S.ITEM_ID] for p in rec.popular[:4]]
    t = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(minutes=5)
    same = [{"user_id": user, "item_id": items[i], "event_timestamp": t.isoformat()} for i in range(2)]
    for e in same:  # two requests in the same second
        assert c.post("/events", json=e, headers=AUTH).status_code == 202
    late = {"user_id": user, "item_id": items[2], "event_timestamp": (t - pd.Timedelta(hours=1)).isoformat()}
    assert c.post("/events", json=late, headers=AUTH).status_code == 202
    feats = rec.online_features(user)
    assert feats[S.RECENT_ITEM_IDS] == [items[2], items[0], items[1]] and feats[S.EVENT_COUNT] == 3
    assert feats[S.LAST_SEEN] == int(t.timestamp()) and feats[S.FIRST_SEEN] == int(t.timestamp()) - 3600
    out = c.get(f"/recommendations/{user}", params={"k": 5}).json()
    assert out["strategy"] == "personalized" and out["history_length"] == 3


@pytest.mark.integration
def test_every_response_is_in_the_served_log(app) -> None:
    c, rec = app["client"], app["rec"]
    user = _user(app, 3)
    r = c.get(f"/recommendations/{user}", params={"k": 4}, headers={"X-Request-ID": "req-abc-1"})
    fallback = c.get("/recommendations/987654321", params={"k": 3}).json()
    assert r.headers["x-request-id"] == "req-abc-1" and r.json()["request_id"] == "req-abc-1"
    app["app"].state.served_log.flush()
    served = rec.log.read("synth", L.SERVED).set_index("request_id")
    row, body = served.loc["req-abc-1"], r.json()
    assert row[S.USER_ID] == user and row["strategy"] == "personalized" and row["k"] == 4
    assert row["model_version"] == rec.bundle.version and row["collection"] == rec.collection
    assert row["item_ids"] == [i[S.ITEM_ID] for i in body["items"]]
    assert row[S.IS_COLD_START] == [i[S.IS_COLD_START] for i in body["items"]]
    assert row[S.IS_LONG_TAIL] == [i[S.IS_LONG_TAIL] for i in body["items"]]
    assert row["latency_ms"] == pytest.approx(body["timing_ms"]["total"])
    assert served.loc[fallback["request_id"], "strategy"] == "popular"


@pytest.mark.integration
def test_served_log_sample_rate(app) -> None:
    target = lambda: (app["rec"].log, "synth_sampled")  # noqa: E731
    none = events.ServedLog(target, sample=0.0, flush_s=60)
    every = events.ServedLog(target, sample=1.0, flush_s=60)
    resp = {S.USER_ID: 1, "strategy": "popular", "items": [], "timing_ms": {"total": 1.0}}
    assert not any(none.record(resp, f"n{i}") for i in range(20))
    assert all(every.record(resp, f"e{i}") for i in range(20))
    none.close()
    every.close()
    assert len(app["rec"].log.read("synth_sampled", L.SERVED)) == 20


@pytest.mark.integration
def test_new_items_are_saved_in_the_log_with_sequence_ids(app) -> None:
    c, rec = app["client"], app["rec"]
    top = int(data.load_items(app["cfg"], "synth")[S.ITEM_ID].max())
    r = c.post("/items", json={"title": "Bread and Soup Vol. 9", "category": "Cooking", "source_id": "shop-77"},
               headers=AUTH)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["created"] and new[S.ITEM_ID] > top and new[S.SOURCE_ID] == "shop-77" and new["recommendable"]
    saved = rec.log.item("synth", source_id="shop-77")
    assert saved[S.ITEM_ID] == new[S.ITEM_ID] and saved[S.TITLE] == "Bread and Soup Vol. 9"
    # A retry with the caller's id answers with the same item, nothing added twice.
    retry = c.post("/items", json={"title": "Bread and Soup Vol. 9", "source_id": "shop-77"}, headers=AUTH)
    assert retry.status_code == 200 and retry.json()[S.ITEM_ID] == new[S.ITEM_ID] and not retry.json()["created"]
    assert (rec.log.items("synth")[S.SOURCE_ID] == "shop-77").sum() == 1
    second = c.post("/items", json={"title": "Galaxy Rockets"}, headers=AUTH).json()
    assert second[S.ITEM_ID] > new[S.ITEM_ID]
    assert c.post("/items", json={"item_id": second[S.ITEM_ID], "title": "again"}, headers=AUTH).status_code == 409
    # What the pipeline would quarantine when it lands the item is refused here.
    assert c.post("/items", json={"title": "x" * 1001}, headers=AUTH).status_code == 422
    # Events on an item added online are accepted at once.
    e = c.post("/events", json={"user_id": 5, "item_id": second[S.ITEM_ID]}, headers=AUTH)
    assert e.status_code == 202 and e.json()["accepted"] == 1


@pytest.mark.integration
def test_restart_recovers_items_and_events_that_missed_the_index_or_the_online_store(app) -> None:
    """As if the service died after the log write: an item saved but never indexed, an event logged but
    never applied online. The next start (and `learn index`) pick both up."""
    cfg, rec = app["cfg"], app["rec"]
    with open_log(cfg) as log:
        lost = log.save_item("synth", {S.TITLE: "Secret Garden Compost Vol. 3", S.CATEGORY: "Gardening"},
                             floor=rec.catalogue_max_id)
        user, item = 515_151, rec.popular[2][S.ITEM_ID]
        log.append_events("synth", [L.Event("crashed-1", user, item, L.now_us() - 60_000_000)])
    assert lost.item_id not in rec.replica and rec.online_features(user)[S.RECENT_ITEM_IDS] is None
    again = recommender.Recommender(cfg, "synth")
    try:
        assert lost.item_id in again.replica and again.known_item(lost.item_id)
        assert again.online_features(user)[S.RECENT_ITEM_IDS] == [item]
        assert again.replayed["events"] >= 1
        assert again.health()["checks"]["eventlog"]["status"] == "ok"
    finally:
        again.close()
    # `learn index` encodes items nobody encoded yet, then indexes them with the others added online.
    with open_log(cfg) as log:
        pending = log.save_item("synth", {S.TITLE: "Orbit Telescope Stars", S.CATEGORY: "Space"},
                                floor=rec.catalogue_max_id).item_id
        assert pending in set(bundle.pending_items(cfg, "synth", log)[S.ITEM_ID])
        assert bundle.encode_pending_items(cfg, "synth", log, skip=rec.bundle.knows) == [pending]
        assert bundle.pending_items(cfg, "synth", log).empty
    parts, content = bundle.load_new_items(cfg, "synth")
    assert {lost.item_id, pending} <= set(parts[S.ITEM_ID]) and content.shape[0] == len(parts)


@pytest.mark.integration
def test_rebuild_restores_exact_values_and_keeps_the_unlanded_tail(app) -> None:
    from learn_tasks.orchestration import landing, runs

    cfg, c, rec = app["cfg"].with_overrides(validate={"data_docs": False, "max_failed_share": 0.9}), app["client"], app["rec"]
    user = _user(app, 5)
    inter = data.load_interactions(cfg, "synth")
    seen = set(inter.loc[inter[S.USER_ID] == user, S.ITEM_ID])
    items = [p[S.ITEM_ID] for p in rec.popular if p[S.ITEM_ID] not in seen][:3]
    now = pd.Timestamp.now(tz="UTC").floor("s")
    for i, item in enumerate(items[:2]):
        c.post("/events", json={"user_id": user, "item_id": item, "event_timestamp": (now - pd.Timedelta(minutes=2 - i)).isoformat()},
               headers=AUTH)
    end = (now + pd.Timedelta(hours=1)).floor("h")
    a = runs.RunArgs("synth", runs.INCREMENTAL, end - pd.Timedelta(days=1), end)
    landing.land_logs(cfg, a)
    landing.validate_logs(cfg, a)
    # An event after the landing: not in the published data yet, but online.
    c.post("/events", json={"user_id": user, "item_id": items[2], "event_timestamp": now.isoformat()}, headers=AUTH)
    res = updates.refresh_features(cfg, "synth")
    assert res["rebuilt"] and res["replayed"]["events"] >= 1
    inter = data.load_interactions(cfg, "synth")
    mine = inter[inter[S.USER_ID] == user].sort_values(S.EVENT_TIMESTAMP, kind="stable")
    assert mine[S.ITEM_ID].tolist()[-2:] == items[:2]  # published exactly once
    feats = rec.online_features(user)
    expected = (mine[S.ITEM_ID].tolist() + [items[2]])[-20:]
    assert feats[S.RECENT_ITEM_IDS] == expected and feats[S.EVENT_COUNT] == len(mine) + 1
    assert feats[S.DISTINCT_ITEMS] == len(set(mine[S.ITEM_ID]) | {items[2]})


# ------------------------------------------------------------------------------------- real Redis
@pytest.mark.production
@pytest.mark.parametrize("skip_dedup", [False, True])
def test_same_second_and_late_events_on_redis(settings: Settings, synth_dataset: str, skip_dedup: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Feast's Redis store drops a write whose row time is not newer than the stored one; online rows are
    stamped with the time of writing, so every event lands, with or without Redis' dedup (the production
    profile turns it off). A rebuild after pushes still replaces them."""
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis on 127.0.0.1:6379: {exc}")
    from feast import FeatureStore

    registry_url = os.environ.get("LEARN_TEST_REGISTRY_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    name = f"prod_{uuid.uuid4().hex[:8]}"
    src, dst = settings.paths.dataset(synth_dataset), settings.paths.dataset(name)
    dst.mkdir(parents=True)
    for f in src.glob("*.*"):
        (dst / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LEARN_FEATURES__REGISTRY_URL", registry_url)
    cfg = load_settings(overrides=["features.online_store=redis", "features.registry=sql", "features.recent_items=5"])
    try:
        features.materialize_features(cfg, name)
        conf = features.repo_config(cfg, name, write=False)
        assert conf.online_store.skip_dedup is True  # the production template
        conf.online_store.skip_dedup = skip_dedup
        store = FeatureStore(repo_path=str(features.store_dir(cfg, name)), config=conf)
        inter = data.load_interactions(cfg, name)
        user, other = (int(u) for u in inter[S.USER_ID].unique()[:2])
        start = features.online_user_features(store, [user, other])
        t = int(inter[S.EVENT_TIMESTAMP].max().timestamp()) + 10 * 86400
        for item, ts in ((101, t), (102, t), (103, t - 3600)):  # the same second twice, then a late one
            updates.push_events(store, [(user, item, ts)], recent=5)
        got = features.online_user_features(store, [user])[user]
        assert got[S.RECENT_ITEM_IDS] == (start[user][S.RECENT_ITEM_IDS] + [103, 101, 102])[-5:]
        assert got[S.RECENT_TIMESTAMPS][-3:] == [t - 3600, t, t]
        assert got[S.EVENT_COUNT] == start[user][S.EVENT_COUNT] + 3 and got[S.LAST_SEEN] == t
        if not skip_dedup:
            # Control: rows stamped with their event time (as before) lose the second same-second write.
            stamp = pd.Timestamp.now(tz="UTC").floor("s") + pd.Timedelta(days=1)
            for item in (201, 202):
                store.write_to_online_store(features.USER_RECENT_VIEW, pd.DataFrame({
                    S.USER_ID: [other], S.EVENT_TIMESTAMP: [stamp], S.RECENT_ITEM_IDS: [[item]],
                    S.RECENT_TIMESTAMPS: [[int(stamp.timestamp())]]}))
            assert features.online_user_features(store, [other])[other][S.RECENT_ITEM_IDS] == [201]
        # The rebuild replaces what the pushes wrote, although they are newer than the data.
        features.materialize_features(cfg, name, force=True)
        assert features.online_user_features(store, [user])[user] == start[user]
    finally:
        features.teardown(cfg, name)
