"""Releases and the service that follows them, over real embedded Feast (SQLite) and Milvus Lite with
models trained for one epoch on generated data.

The service starts without any release (popular items, /health "degraded: no model yet", HTTP 200),
serves a release as soon as one is written, swaps to the next one under load without a failed request,
never loses the collections it may still answer from to pruning, and a restart between a promotion and
the load that releases it serves the previous release as before. Marked ``production``: the same with
the promotion and the release record in PostgreSQL (``state.backend: postgres``).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from learn_tasks import schema as S
from learn_tasks.config import Settings, load_settings
from learn_tasks.data import datasets as data
from learn_tasks.online import index, releases
from learn_tasks.online import service as serve

from helpers import free_port, wait_for

TOKEN = "release-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------- the record
def test_release_record_is_idempotent_with_history_and_protection(settings: Settings) -> None:
    assert releases.current(settings, "d") is None and releases.protected_collections(settings, "d") == set()
    first, new = releases.write(settings, "d", "run-a", "items__d__run_a", source="test")
    assert new and first["release_id"] == 1 and first["previous"] is None
    again, new = releases.write(settings, "d", "run-a", "items__d__run_a", source="test again")
    assert not new and again == first  # releasing what is released writes nothing
    second, new = releases.write(settings, "d", "run-b", "items__d__run_b", source="test", run_key="k")
    assert new and second["release_id"] == 2 and second["run_key"] == "k"
    assert second["previous"] == {"release_id": 1, "model_version": "run-a", "collection": "items__d__run_a"}
    assert releases.current(settings, "d") == second
    assert [r["release_id"] for r in releases.history(settings, "d")] == [1, 2]
    assert releases.protected_collections(settings, "d") == {"items__d__run_a", "items__d__run_b"}
    third, _ = releases.write(settings, "d", "run-c", "items__d__run_c", source="test")
    assert releases.protected_collections(settings, "d") == {"items__d__run_b", "items__d__run_c"}
    # A torn last history line (a crash mid-append) is skipped; the record still says what is served.
    with open(settings.paths.release_history("d"), "a") as fh:
        fh.write('{"release_id": 4, "model_')
    assert [r["release_id"] for r in releases.history(settings, "d")] == [1, 2, 3]
    assert releases.current(settings, "d") == third
    assert releases.model_dir(settings, "d", third) == settings.paths.dataset_models("d") / "run-c"


def test_service_without_data_or_release_answers_and_says_why(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    app = serve.create_app(settings, "nothing-here")
    c = TestClient(app)
    h = c.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "degraded"
    assert h.json()["reason"].startswith("no model yet: no release for dataset 'nothing-here'")
    r = c.get("/recommendations/1").json()
    assert r["strategy"] == "popular" and r["fallback"] and r["items"] == [] and r["model_version"] is None
    assert r["reason"].startswith("no model yet: no data for dataset 'nothing-here'")
    assert c.post("/items", json={"title": "x"}, headers={"Authorization": "Bearer t"}).status_code in (401, 503)
    assert c.get("/explorer/api/status").json()["ready"] is False


# ------------------------------------------------------------------------------------- with models
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Generated data, encoded, Feast features built and three one-epoch model runs; nothing promoted."""
    from learn_tasks.ceg import encode
    from learn_tasks.data import synth
    from learn_tasks.online import features
    from learn_tasks.training import train

    home = tmp_path_factory.mktemp("release") / "learn_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEARN_HOME", str(home))
    mp.setenv("LEARN_API_TOKEN", TOKEN)
    cfg = load_settings(overrides=["index.index_type=FLAT", "features.recent_items=20", "train.val_users=50",
                                   "index.keep_versions=1", "serve.release_poll_s=0.2",
                                   "serve.replica_refresh_s=0"])
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=100, n_items=150))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    encode.encode_catalogue(cfg, "synth")
    runs = [Path(train.train_model(cfg, "synth", epochs=1)["run_dir"]) for _ in range(3)]
    assert len({r.name for r in runs}) == 3
    features.materialize_features(cfg, "synth")
    yield cfg, runs
    index.close(cfg)
    mp.undo()


def _release(cfg: Settings, run: Path) -> dict:
    """What load_milvus does for a newly promoted model: promote, then index (load, check, swap, release)."""
    from learn_tasks.pch import registry

    registry.promote(cfg, "synth", run)
    return index.index_catalogue(cfg, "synth", source="test")


def _known_user(cfg: Settings) -> int:
    return int(data.load_interactions(cfg, "synth")[S.USER_ID].iloc[0])


class _Server:
    """The app under uvicorn in a thread (lifespan on: the release watcher runs), on a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, "the server did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.mark.integration
def test_service_starts_without_a_release_then_follows_each_one_without_a_failed_request(trained) -> None:
    import httpx

    cfg, (run1, run2, _) = trained
    for path in (cfg.paths.release("synth"), cfg.paths.release_history("synth")):
        path.unlink(missing_ok=True)  # this home has released nothing yet
    app = serve.create_app(cfg, "synth")
    follower = app.state.live
    user = _known_user(cfg)
    inter = data.load_interactions(cfg, "synth")
    most_consumed = inter[S.ITEM_ID].value_counts().index[0]

    with _Server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        # 1. No release: popular items of the catalogue, degraded health with HTTP 200, the process stays up.
        h = http.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded"
        assert h.json()["reason"].startswith("no model yet: no release for dataset 'synth'")
        r = http.get(f"/recommendations/{user}", params={"k": 5}).json()
        assert r["strategy"] == "popular" and r["fallback"] and r["model_version"] is None
        assert r["reason"] == "no model yet" and len(r["items"]) == 5
        assert r["items"][0][S.ITEM_ID] == int(most_consumed)
        assert http.post("/items", json={"title": "Too early"}, headers=AUTH).status_code == 503

        # 2. A release is written: the running service serves it, no restart.
        rel1 = _release(cfg, run1)["release"]
        assert rel1["new"] and rel1["model_version"] == run1.name
        wait_for(lambda: http.get(f"/recommendations/{user}").json()["model_version"] == run1.name,
              "the service never served the first release")
        body = http.get(f"/recommendations/{user}", params={"k": 5}).json()
        assert body["strategy"] == "personalized" and body["index_collection"] == rel1["collection"]
        h = http.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert h.json()["release"]["release_id"] == rel1["release_id"]
        added = http.post("/items", json={"title": "Added Before The Swap", "category": "Books"}, headers=AUTH)
        assert added.status_code == 201 and added.json()["collection"] == rel1["collection"]

        # 3. A second release while a thread keeps asking: every request answers, the model only moves forward.
        seen: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def ask() -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                while not stop.is_set():
                    resp = c.get(f"/recommendations/{user}", params={"k": 10})
                    seen.append((resp.status_code, resp.json().get("model_version")
                                 if resp.status_code == 200 else resp.text))

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            wait_for(lambda: len(seen) >= 5, "no request answered before the swap")
            rel2 = _release(cfg, run2)["release"]
            wait_for(lambda: any(v == run2.name for _, v in seen), "the service never served the second release")
            n = len(seen)
            wait_for(lambda: len(seen) >= n + 5, "no request answered after the swap")
        finally:
            stop.set()
            asker.join(timeout=60)
        assert [s for s in seen if s[0] != 200] == []  # zero failed requests during the switch
        versions = [v for _, v in seen]
        first_new = versions.index(run2.name)
        assert set(versions[:first_new]) == {run1.name} and set(versions[first_new:]) == {run2.name}
        assert follower.swaps == 2 and follower.release["release_id"] == rel2["release_id"]
        # The item added on the first release is in the second one's collection (and answers there).
        new_id = added.json()[S.ITEM_ID]
        assert new_id in follower.recommender.replica and follower.recommender.collection == rel2["collection"]
        moved = http.post("/items", json={"title": "Added After The Swap", "category": "Books"}, headers=AUTH)
        assert moved.status_code == 201 and moved.json()["collection"] == rel2["collection"]

        # 4. `learn rollback` releases the previous model again: the service follows, still no restart.
        from typer.testing import CliRunner

        from learn_tasks.cli import app as cli

        out = CliRunner().invoke(cli, ["rollback", "--dataset", "synth", "--json"])
        assert out.exit_code == 0, out.output
        back = json.loads(out.output)
        assert back["to"] == rel1["collection"] and back["release_id"] == rel2["release_id"] + 1
        rec = releases.current(cfg, "synth")
        assert rec["model_version"] == run1.name and rec["source"] == "learn rollback"
        wait_for(lambda: http.get(f"/recommendations/{user}").json()["model_version"] == run1.name,
              "the service never followed the rollback")
        assert http.get("/explorer/api/status").json()["model_version"] == run1.name


@pytest.mark.integration
def test_pruning_keeps_the_released_and_the_previous_collection(trained) -> None:
    cfg, runs = trained  # index.keep_versions = 1
    names = [index.collection_name("synth", r.name) for r in runs]
    _release(cfg, runs[0])
    _release(cfg, runs[1])  # released: run 1 (previous: run 0)
    built = _release(cfg, runs[2])
    # While run 2's collection was loaded, run 1's was released and run 0's was the previous release.
    assert not set(built["dropped"]) & {names[0], names[1]}
    rel = releases.current(cfg, "synth")
    assert rel["collection"] == names[2] and rel["previous"]["collection"] == names[1]
    # Now the released (run 2) and the previous (run 1) stay; run 0 goes, beyond keep_versions.
    dropped = index.prune(cfg, "synth")
    have = {v["collection"] for v in index.versions(cfg, "synth")}
    assert names[0] in dropped and {names[1], names[2]} <= have and names[0] not in have


@pytest.mark.integration
def test_a_restart_between_promotion_and_load_serves_the_previous_release(trained) -> None:
    from fastapi.testclient import TestClient

    from learn_tasks.online import recommender
    from learn_tasks.pch import registry

    cfg, runs = trained
    _release(cfg, runs[0])
    rel = releases.current(cfg, "synth")
    registry.promote(cfg, "synth", runs[1])  # the pipeline promoted, then stopped before load_milvus
    assert registry.promoted(cfg, "synth") == runs[1] and rel["model_version"] == runs[0].name

    restarted = TestClient(serve.create_app(cfg, "synth"))  # a fresh process would build the same app
    h = restarted.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok", h.json()
    assert h.json()["checks"]["model"]["version"] == runs[0].name
    body = restarted.get(f"/recommendations/{_known_user(cfg)}").json()
    assert body["model_version"] == runs[0].name and body["index_collection"] == rel["collection"]
    current = recommender.Recommender(cfg, "synth", load_encoder=False)
    try:
        assert current.bundle.version == runs[0].name
    finally:
        current.close()  # its replica watcher would outlive the test's Milvus client

    # The load then runs: the next look serves the promoted model.
    index.index_catalogue(cfg, "synth", source="test")
    assert restarted.app.state.live.check() == "ok"
    assert restarted.get(f"/recommendations/{_known_user(cfg)}").json()["model_version"] == runs[1].name


@pytest.mark.integration
def test_a_release_that_cannot_load_leaves_the_served_one_in_place(trained) -> None:
    from fastapi.testclient import TestClient

    cfg, runs = trained
    _release(cfg, runs[0])
    c = TestClient(serve.create_app(cfg, "synth"))
    follower = c.app.state.live
    served = follower.release
    # A record naming a collection that does not exist (written by hand, or dropped since).
    releases.write(cfg, "synth", runs[1].name, "items__synth__gone", source="test")
    assert follower.check() == "ok" and follower.release == served
    assert c.get(f"/recommendations/{_known_user(cfg)}").json()["model_version"] == runs[0].name
    health = c.get("/health").json()
    assert health["status"] == "ok" and str(served["release_id"] + 1) in health["release"]["failed_releases"]
    # Fixed by a real release: served at the next look.
    index.index_catalogue(cfg, "synth", run_dir=runs[2], source="test")
    assert follower.check() == "ok" and follower.release["model_version"] == runs[2].name


@pytest.mark.integration
def test_a_home_indexed_before_release_records_serves_its_alias(trained) -> None:
    cfg, runs = trained
    built = _release(cfg, runs[0])
    for path in (cfg.paths.release("synth"), cfg.paths.release_history("synth")):
        path.unlink()  # as a home indexed by an older version: a promoted model and an alias, no record
    app = serve.create_app(cfg, "synth")
    follower = app.state.live
    assert follower.release["release_id"] == 0 and follower.recommender.collection == built["collection"]
    assert follower.recommender.bundle.version == runs[0].name and follower.health()[1] == 200
    # The first real release of the same model and collection loads nothing again.
    index.release(cfg, "synth", built["collection"], source="test")
    assert follower.check() == "ok" and follower.swaps == 1 and follower.release["release_id"] == 1


@pytest.mark.integration
@pytest.mark.production
def test_a_release_recorded_in_postgresql_is_served(trained, pg_url: str) -> None:
    """The production state backend: promotion and release records in PostgreSQL (nothing under
    LEARN_HOME moves), and a service started on that profile serves the release."""
    from fastapi.testclient import TestClient

    from learn_tasks.pch import registry

    files_cfg, runs = trained
    cfg = files_cfg.with_overrides(state={"backend": "postgres", "url": pg_url})
    before = (releases.current(files_cfg, "synth"), registry.promoted(files_cfg, "synth"))
    built = _release(cfg, runs[2])
    rel = releases.current(cfg, "synth")
    assert built["release"]["new"] and rel["release_id"] == 1 and rel["model_version"] == runs[2].name
    assert registry.promoted(cfg, "synth") == runs[2]
    assert [p["run_id"] for p in registry.promotions(cfg, "synth")] == [runs[2].name]
    assert (releases.current(files_cfg, "synth"), registry.promoted(files_cfg, "synth")) == before
    c = TestClient(serve.create_app(cfg, "synth"))
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["release"]["release_id"] == 1
    assert c.get(f"/recommendations/{_known_user(cfg)}").json()["model_version"] == runs[2].name
