"""The product's loop, closed end to end on the embedded default stack (Airflow's own runner with SQLite
metadata, Feast on SQLite, the Milvus Lite server, the SQLite event log), on the small generated dataset
of ``conftest.py``, with one-epoch trainings:

1. ``learn serve`` (a child process, its own LEARN_HOME, a free port) starts without a release: ``/health``
   says degraded, "no model yet", the popular items of the catalogue answer, and the process stays up;
2. a full ``learn_pipeline`` run (``runner.run_pipeline``, what ``learn run`` calls) trains, gates, loads
   Milvus and writes release 1;
3. the running service serves release 1's model, without a restart;
4. events (client event ids, a same-second pair, a duplicate, a conflicting reuse) and new items are
   posted; the service is killed with SIGKILL between two batches, the client sends the unanswered batch
   again until the restarted service takes it; every acknowledged event id is kept;
5. an incremental run (the scheduled mode) lands the event log under its watermark and fine-tunes;
6. every acknowledged event is in that run's landed batch, in the published dataset and in the split it
   trained on exactly once (none lost, none twice), and landing again lands nothing new;
7. the gate promotes the fine-tune (``pipeline.promotion_margin`` = 1 here: every candidate with a score
   passes) and the running service switches to release 2;
8. the monitoring run over the test's traffic window reports the online values of what the test saw:
   served responses, fallback share, cold-start / long-tail exposure, hit rate, latency, events, new items.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.config import Settings, load_settings
from learn_tasks.data import datasets as data
from learn_tasks.data import eventlog as L
from learn_tasks.data import splits
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.monitoring.monitor import monitor_window
from learn_tasks.online import index, milvus_server, releases
from learn_tasks.orchestration import landing, runner, runs
from learn_tasks.storage import read_json

from helpers import ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN = "loop-e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = 10
# The service (a child process) and the pipeline's tasks read their settings from the environment.
SETTINGS = {
    "LEARN_API_TOKEN": TOKEN,
    "LEARN_SERVE__RELEASE_POLL_S": "0.2",  # the service looks for a new release five times a second
    "LEARN_EVENTLOG__SERVED_FLUSH_S": "0.05",
    "LEARN_INDEX__INDEX_TYPE": "FLAT",
    "LEARN_TRAIN__VAL_USERS": "50",
    "LEARN_FEATURES__RECENT_ITEMS": "20",
    "LEARN_PIPELINE__GATE_USERS": "100",
    "LEARN_PIPELINE__INCREMENTAL_EVAL_USERS": "100",
    # The gate keeps the served model when the candidate is worse by more than this share of its score;
    # 1.0 puts the floor at 0, so the fine-tune is promoted whatever one epoch did to it (default 0.02).
    "LEARN_PIPELINE__PROMOTION_MARGIN": "1.0",
}


class Client:
    """The test's side of the traffic: every recommendation response it got, every event id acknowledged."""

    def __init__(self, url: str):
        import httpx

        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)
        self.responses: list[dict] = []
        self.acked: set[str] = set()

    def reconnect(self) -> None:
        """A fresh connection pool (the old one's connections died with a killed service)."""
        import httpx

        self.http.close()
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def recommend(self, user: int, **params) -> dict:
        r = self.http.get(f"/recommendations/{user}", params={"k": K, **params})
        assert r.status_code == 200, r.text
        self.responses.append(r.json())
        return self.responses[-1]

    def post_events(self, events: list[dict]) -> dict:
        r = self.http.post("/events", json={"events": events}, headers=AUTH)
        assert r.status_code == 202, r.text
        body = r.json()
        self.acked.update(body["event_ids"])
        return body

    def post_event(self, event: dict):
        r = self.http.post("/events", json=event, headers=AUTH)
        if r.status_code == 202:
            self.acked.update(r.json()["event_ids"])
        return r

    def add_item(self, **fields) -> dict:
        r = self.http.post("/items", json=fields, headers=AUTH)
        assert r.status_code in (200, 201), r.text
        return r.json()


class Sender(threading.Thread):
    """Posts event batches in order as a client with a retry queue does: a batch whose request fails in
    transport (the service is gone) or is refused (503 while it starts) is sent again, with the same event
    ids, until it is acknowledged. Stops before batch ``pause_at`` until ``resume`` is set."""

    def __init__(self, url: str, batches: list[list[dict]], pause_at: int, deadline_s: float = 600.0):
        super().__init__(daemon=True)
        self.url, self.batches, self.pause_at = url, batches, pause_at
        self.paused, self.resume = threading.Event(), threading.Event()
        self.acked: set[str] = set()
        self.answered = 0
        self.transport_errors = self.refused = 0
        self.deadline = time.monotonic() + deadline_s
        self.error: BaseException | None = None

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                for i, batch in enumerate(self.batches):
                    if i == self.pause_at:
                        self.paused.set()
                        self.resume.wait()
                    while time.monotonic() < self.deadline:
                        try:
                            r = client.post("/events", json={"events": batch}, headers=AUTH)
                        except httpx.HTTPError:
                            self.transport_errors += 1
                            time.sleep(0.1)
                            continue
                        if r.status_code == 202:
                            body = r.json()
                            assert body["rejected"] == [], body
                            self.acked.update(body["event_ids"])
                            self.answered += 1
                            break
                        self.refused += 1
                        time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            self.error = exc


def _served_count(cfg: Settings, dataset: str) -> int:
    with open_log(cfg) as log:
        return log.status(dataset)[L.SERVED]["records"]


def _run_args(summary: dict) -> runs.RunArgs:
    r = summary["run"]
    return runs.RunArgs(r["dataset"], r["mode"], pd.Timestamp(r["start"]), pd.Timestamp(r["end"]),
                        window_days=r["window_days"])


def _clean_run(cfg: Settings, summary: dict) -> None:
    """Every task succeeded at its first try: a retry is a failure the run recovered from, not a clean run."""
    assert summary["ok"], (summary.get("failures"), summary["tasks"])
    retried = [t for t in summary["tasks"] if t["tries"] != 1]
    notes = sorted(p.read_text() for p in (runs.run_dir(cfg, _run_args(summary)) / "failures").glob("*.json"))
    assert not retried and not notes, (retried, notes)


def _keyed(frame: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``frame`` matching a logged event on (user, item, event time), with that event's id."""
    key = [S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]
    return frame[key].merge(events[[*key, "event_id"]], on=key, how="inner")


@pytest.mark.timeout(1200)
def test_the_loop_is_closed(settings: Settings, synth_dataset: str, airflow_home: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    ds = synth_dataset
    for key, value in SETTINGS.items():
        monkeypatch.setenv(key, value)
    cfg = load_settings()
    home = Path(cfg.home)
    inter0 = data.load_interactions(cfg, ds)
    items0 = data.load_items(cfg, ds)
    users = [int(u) for u in inter0[S.USER_ID].unique()]
    poll_user, hit_users, event_users = users[0], users[1:5], users[5:25]
    catalogue = [int(i) for i in items0[S.ITEM_ID]]
    today = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d")

    # The Milvus Lite data is shared by the service and the pipeline through its local server, as
    # Milvus itself is in production.
    milvus_server.start(cfg, port=free_port())
    service = ServiceProcess(home, ds)
    t_start = pd.Timestamp.now(tz="UTC")
    try:
        # ---- 1. no release yet: popular items, degraded health, the process stays up
        health = service.start()
        assert health["status"] == "degraded" and health["reason"].startswith("no model yet"), health
        c = Client(service.url)
        popular = inter0[S.ITEM_ID].value_counts(sort=False).sort_index().sort_values(ascending=False, kind="stable")
        r = c.recommend(poll_user)
        assert (r["strategy"], r["fallback"], r["model_version"]) == ("popular", True, None)
        assert [i[S.ITEM_ID] for i in r["items"]] == [int(i) for i in popular.index[:K]]
        early = c.post_event({"user_id": poll_user, "item_id": catalogue[0], "event_id": "too-early"})
        assert early.status_code == 503 and "no model yet" in early.json()["detail"]  # not acknowledged

        # ---- 2. a full pipeline run: train, gate, Milvus, release 1
        full = runner.run_pipeline(cfg, dataset=ds, mode="full", day=today, epochs=1, budget_s=30,
                                   airflow_home=airflow_home)
        _clean_run(cfg, full)
        run1 = Path(full["training"]["run_dir"])
        assert full["promotion"]["promoted"] and full["milvus"]["released"]
        rel1 = releases.current(cfg, ds)
        assert rel1["model_version"] == run1.name and rel1["release_id"] == full["milvus"]["release_id"] == 1
        assert service.alive(), service.log_tail()  # never exited while it had no model

        # ---- 3. the running service follows release 1
        wait_for(lambda: c.recommend(poll_user)["model_version"] == run1.name,
                 "the service never served release 1", timeout_s=180, every_s=0.25)
        assert c.responses[-1]["strategy"] == "personalized"
        health = c.http.get("/health").json()
        assert health["status"] == "ok" and health["release"]["release_id"] == 1, health

        # ---- 4. events and items, a kill -9 in the middle, a restart
        now_s = pd.Timestamp.now(tz="UTC").floor("s")
        first = c.post_events([{"user_id": u, "item_id": catalogue[(7 * n) % len(catalogue)], "event_id": f"a-{n}"}
                               for n, u in enumerate(event_users[:10])])
        assert (first["accepted"], first["duplicates"]) == (10, 0)
        same_second = [{"user_id": event_users[10], "item_id": catalogue[k], "event_id": f"pair-{k}",
                        "event_timestamp": now_s.isoformat()} for k in (1, 2)]
        counts = []
        for ev in same_second:  # two requests, one second: both in the user's online history
            r = c.post_event(ev)
            assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
            counts.append(r.json()[S.EVENT_COUNT])
        assert counts[1] == counts[0] + 1
        again = c.post_event(same_second[0])  # the client sends it again: acknowledged, not stored twice
        assert again.status_code == 202 and (again.json()["accepted"], again.json()["duplicates"]) == (0, 1)
        clash = c.post_event({**same_second[0], "item_id": catalogue[3]})  # the id reused for another event
        assert clash.status_code == 409 and clash.json()["event_ids"] == []
        new_items = [c.add_item(title="Orbital Gardens: Growing Herbs in Space", category="Gardening")]
        r = c.post_event({"user_id": event_users[11], "item_id": new_items[0][S.ITEM_ID], "event_id": "on-new-1"})
        assert r.status_code == 202 and r.json()["accepted"] == 1, r.text

        batches = [[{"user_id": event_users[12 + (b + j) % 8], "item_id": catalogue[(13 * b + j) % len(catalogue)],
                     "event_id": f"b-{b}-{j}"} for j in range(5)] for b in range(4)]
        sender = Sender(service.url, batches, pause_at=2)
        sender.start()
        wait_for(sender.paused.is_set, "the first two batches were not acknowledged", timeout_s=120)
        assert sender.answered == 2
        # What the service served so far is in the served log before the kill (it writes every 0.05 s).
        wait_for(lambda: _served_count(cfg, ds) == len(c.responses), "the served log lags the responses", timeout_s=30)
        service.kill9()
        sender.resume.set()
        wait_for(lambda: sender.transport_errors > 0, "the client never met the killed service", timeout_s=30)
        health = service.start()  # same home, same port
        assert health["status"] == "ok" and health["release"]["release_id"] == 1, health
        sender.join(timeout=300)
        assert not sender.is_alive() and sender.error is None, sender.error
        assert sender.answered == len(batches) and sender.acked == {e["event_id"] for b in batches for e in b}
        c.acked |= sender.acked
        c.reconnect()

        # After the restart: the log kept what was acknowledged before the kill.
        resent = c.post_events([batches[0][0], {"user_id": event_users[11], "item_id": new_items[0][S.ITEM_ID],
                                                "event_id": "on-new-2"}])
        assert (resent["accepted"], resent["duplicates"]) == (1, 1)
        new_items.append(c.add_item(title="The Detective's Sourdough", category="Mystery", source_id="loop-src-1"))
        assert c.add_item(title="The Detective's Sourdough", source_id="loop-src-1")[S.ITEM_ID] == \
            new_items[-1][S.ITEM_ID]  # the same source_id again: the same item, no second one
        r = c.post_event({"user_id": event_users[12], "item_id": new_items[-1][S.ITEM_ID], "event_id": "on-new-3"})
        assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
        # Hits: each of these users consumes the first item of the one response it got.
        for u in hit_users:
            got = c.recommend(u)
            r = c.post_event({"user_id": u, "item_id": got["items"][0][S.ITEM_ID], "event_id": f"hit-{u}"})
            assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
        for u in (10**12, 10**12 + 1):  # users nobody has seen: a labelled fallback
            assert c.recommend(u)["fallback"]
        new_ids = sorted({int(i[S.ITEM_ID]) for i in new_items})
        assert len(new_ids) == 2 and not set(new_ids) & set(catalogue)

        with open_log(cfg) as log:
            logged = log.read(ds, L.EVENTS)
        assert Counter(logged["event_id"]) == Counter(c.acked)  # each acknowledged event stored once, no other

        # ---- 5. the scheduled (incremental) run lands the log and fine-tunes
        # Its interval is the day of the newest logged event; a two-day window accepts every event time sent.
        day = logged["logged_at"].max().strftime("%Y-%m-%d")
        n_before = len(data.load_interactions(cfg, ds))
        inc = runner.run_pipeline(cfg, dataset=ds, mode=cfg.pipeline.scheduled_mode, day=day, window_days=2,
                                  epochs=1, budget_s=30, airflow_home=airflow_home)
        _clean_run(cfg, inc)
        a = _run_args(inc)
        assert (a.mode, a.window_days, a.key) == (runs.INCREMENTAL, 2, inc["run"]["key"])
        landed = runs.stage_results(cfg, a)["land"]["event_log"]
        assert (landed["events"]["rows"], landed["events"]["new"]) == (len(c.acked), True)
        assert landed["items"]["rows"] == len(new_ids)
        with open_log(cfg) as log:
            status = log.status(ds)
        assert status[L.EVENTS]["not_landed"] == 0 and status[L.EVENTS]["landed_upto"] == landed["events"]["upto"]
        run2 = Path(inc["training"]["run_dir"])
        assert inc["training"]["warm_start"] == str(run1) and not inc["training"]["reused"]

        # ---- 6. every acknowledged event once in what the run landed, published and trained on
        files = landing.landed_files(landing.landing_dir(cfg, a), "interactions")
        batch = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
        assert Counter(batch["event_id"]) == Counter(c.acked)
        v = inc["validation"]
        assert v["interactions"]["read"] == v["interactions"]["accepted"] == len(c.acked), v
        assert v["published"]["interactions_added"] == len(c.acked) and v["published"]["items_added"] == len(new_ids)
        after = data.load_interactions(cfg, ds)
        assert len(after) == n_before + len(c.acked)
        assert Counter(_keyed(after, logged)["event_id"]) == Counter(c.acked)
        split = splits.load_split(cfg, ds, cfg.pipeline.protocol)
        assert Counter(_keyed(split, logged)["event_id"]) == Counter(c.acked)
        train_inputs = read_json(runs.run_dir(cfg, a) / "train.json")["inputs"]
        assert train_inputs["data"] == runs.data_fingerprint(cfg, ds)  # trained on exactly this data
        items_now = data.load_items(cfg, ds)[S.ITEM_ID]
        assert items_now.is_unique and set(new_ids) <= set(items_now)
        # Landing the same interval again gets the same range back; the next interval finds nothing new.
        again = landing.land_logs(cfg, a)["event_log"]["events"]
        assert again == {**landed["events"], "new": False}
        assert Counter(pd.concat([pd.read_parquet(p) for p in files])["event_id"]) == Counter(c.acked)
        republished = landing.validate_logs(cfg, a)["published"]
        assert not republished["changed"] and republished["already_present"] == len(c.acked)
        assert len(data.load_interactions(cfg, ds)) == len(after)
        b = runs.RunArgs(ds, runs.INCREMENTAL, a.end, a.end + pd.Timedelta(days=1))
        assert landing.land_logs(cfg, b)["event_log"]["events"]["rows"] == 0

        # ---- 7. the gate promoted the fine-tune; the service switches to release 2
        gate = inc["promotion"]
        assert gate["promoted"] and gate["previous"] == str(run1) and gate["candidate"] == str(run2), gate
        assert inc["milvus"]["released"] and inc["milvus"]["release_id"] == 2
        wait_for(lambda: c.recommend(poll_user)["model_version"] == run2.name,
                 "the service never served release 2", timeout_s=180, every_s=0.25)
        health = c.http.get("/health").json()
        assert health["status"] == "ok" and health["release"]["release_id"] == 2, health
        assert health["release"]["swaps"] == 2  # release 1 at the restart, then release 2
        assert health["checks"]["index"]["rows"] == len(items_now)  # the new items are in release 2's collection
    finally:
        stopped = service.stop()
        index.close(cfg)
        milvus_server.stop(cfg)
    assert stopped == 0, service.log_tail()
    t_end = pd.Timestamp.now(tz="UTC")

    # ---- 8. monitoring of the test's window: the online values of the traffic the test saw
    assert _served_count(cfg, ds) == len(c.responses)  # the orderly stop flushed the served log
    res = monitor_window(cfg, ds, run_id="loop-e2e", run_date=today, online_start=t_start, online_end=t_end)
    got = res["values"]
    sent = c.responses
    fallback = [float(r["strategy"] != "personalized") for r in sent]
    cold = [np.mean([i[S.IS_COLD_START] for i in r["items"]]) for r in sent]
    tail = [np.mean([i[S.IS_LONG_TAIL] for i in r["items"]]) for r in sent]
    latency = [r["timing_ms"]["total"] for r in sent]
    shown = {i[S.ITEM_ID] for r in sent for i in r["items"]}
    assert got["online.requests"] == len(sent) and got["online.events"] == len(c.acked)
    assert got["online.fallback_share"] == pytest.approx(np.mean(fallback))
    assert 0 < got["online.fallback_share"] < 1
    assert got["online.cold_start_exposure"] == pytest.approx(np.mean(cold))
    assert got["online.long_tail_exposure"] == pytest.approx(np.mean(tail))
    assert got["online.hit_rate"] == pytest.approx(len(hit_users) / len(sent))
    assert min(latency) <= got["online.latency_ms_p50"] <= got["online.latency_ms_p99"] <= max(latency)
    assert got["online.new_items"] == len(new_ids)
    assert got["online.new_items_served"] == len(set(new_ids) & shown)
    assert res["window"]["online"] == [str(t_start), str(t_end)] and "online" in res["sections"]
    print(f"loop: {len(sent)} responses, {len(c.acked)} events acknowledged ({sender.transport_errors} transport "
          f"errors after the kill), {len(new_ids)} new items, full run {full['wall_s']} s, incremental run "
          f"{inc['wall_s']} s")
