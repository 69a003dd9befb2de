"""The durable event log (learn_tasks/data/eventlog.py): idempotent appends, item ids from a sequence,
served records, exactly-once landing under concurrent appends, kill -9 durability of the SQLite log,
and the log feeding the pipeline's landing and validation. Every log test runs on the embedded SQLite
log and, marked ``production``, on the local PostgreSQL server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.config import REPO_ROOT, Settings, load_settings
from learn_tasks.data import eventlog as L
from learn_tasks.data.eventlog_stores import PostgresLog, SqliteLog, open_log

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.production)])
def log(request, tmp_path: Path) -> Iterator[L.EventLog]:
    if request.param == "sqlite":
        store: L.EventLog = SqliteLog(tmp_path / "eventlog.db")
    else:
        store = PostgresLog(request.getfixturevalue("pg_url"))
    ds = f"ds_{uuid.uuid4().hex[:6]}"  # a PostgreSQL database is shared by the module: one dataset per test
    store.test_dataset = ds  # type: ignore[attr-defined]
    yield store
    store.close()


def ev(event_id: str, user: int = 1, item: int = 10, us: int = 1_000_000, timed: bool = True) -> L.Event:
    return L.Event(event_id, user, item, us, timed)


# ------------------------------------------------------------------------------------------ appends
def test_appends_are_idempotent_by_event_id(log: L.EventLog) -> None:
    ds = log.test_dataset
    first = log.append_events(ds, [ev("a"), ev("b", user=2), ev("a")])
    assert [(r.event_id, r.duplicate) for r in first] == [("a", False), ("b", False), ("a", True)]
    assert first[0].seq == first[2].seq and first[0].seq < first[1].seq
    again = log.append_events(ds, [ev("a"), ev("c", user=3), ev("b", user=2, us=5, timed=False)])
    assert [(r.duplicate, r.conflict) for r in again] == [(True, None), (False, None), (True, None)]
    # The same id for another event is not stored and says what the stored one is.
    clash = log.append_events(ds, [ev("a", item=11), ev("c", user=3, us=7)])
    assert all(r.duplicate for r in clash)
    assert "already stored for another event (user 1, item 10" in clash[0].conflict
    assert "user 3, item 10" in clash[1].conflict
    stored = log.read(ds, L.EVENTS)
    assert stored["event_id"].tolist() == ["a", "b", "c"]
    assert stored[S.EVENT_TIMESTAMP].iloc[0] == pd.Timestamp(1, unit="s", tz="UTC")
    assert log.read(f"{ds}_other", L.EVENTS).empty  # datasets are apart


def test_item_ids_come_from_the_sequence_or_the_callers_source_id(log: L.EventLog) -> None:
    ds = log.test_dataset
    a = log.save_item(ds, {S.TITLE: "A", S.SOURCE_ID: "isbn-1"}, floor=500)
    b = log.save_item(ds, {S.TITLE: "B"}, floor=500)
    assert a.created and b.created and a.item_id > 500 and b.item_id > a.item_id
    retry = log.save_item(ds, {S.TITLE: "A (retried)", S.SOURCE_ID: "isbn-1"}, floor=500)
    assert not retry.created and retry.item_id == a.item_id and retry.record[S.TITLE] == "A"
    with pytest.raises(L.ItemExists):
        log.save_item(ds, {S.TITLE: "dup"}, item_id=b.item_id)
    mine = log.save_item(ds, {S.TITLE: "Mine", S.PRICE: 9.5}, item_id=10**6)
    assert mine.item_id == 10**6
    # The catalogue grew past the sequence: the next id is above the new floor.
    assert log.save_item(ds, {S.TITLE: "C"}, floor=2 * 10**6).item_id > 2 * 10**6
    items = log.items(ds)
    assert items[S.ITEM_ID].tolist()[:3] == [a.item_id, b.item_id, 10**6]
    assert items.loc[items[S.ITEM_ID] == 10**6, S.PRICE].iloc[0] == 9.5
    assert log.item(ds, source_id="isbn-1")[S.ITEM_ID] == a.item_id and log.item(ds, item_id=123) is None


def test_concurrent_item_ids_are_unique(log: L.EventLog) -> None:
    ds, got, errors = log.test_dataset, [], []

    def worker(w: int) -> None:
        try:
            for i in range(15):
                got.append(log.save_item(ds, {S.TITLE: f"w{w}-{i}"}, floor=1000).item_id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 60 == len(set(got)) and min(got) > 1000


def test_served_records_round_trip(log: L.EventLog) -> None:
    ds = log.test_dataset
    t0 = pd.Timestamp.now(tz="UTC")
    n = log.append_served(ds, [{"request_id": "r1", S.USER_ID: 7, "model_version": "v1", "collection": "c1",
                                "strategy": "personalized", "k": 2, "latency_ms": 4.5,
                                "items": [{S.ITEM_ID: 3, S.IS_COLD_START: True, S.IS_LONG_TAIL: False},
                                          {S.ITEM_ID: 4, S.IS_COLD_START: False, S.IS_LONG_TAIL: True}]}])
    assert n == 1
    rows = log.read_window(ds, L.SERVED, start=t0 - pd.Timedelta(seconds=5))
    r = rows.iloc[0]
    assert (r["request_id"], r[S.USER_ID], r["model_version"], r["collection"], r["strategy"]) == (
        "r1", 7, "v1", "c1", "personalized")
    assert r["item_ids"] == [3, 4] and r[S.IS_COLD_START] == [True, False] and r[S.IS_LONG_TAIL] == [False, True]
    assert r["latency_ms"] == 4.5 and r["logged_at"] >= t0 - pd.Timedelta(seconds=5)
    assert log.read_window(ds, L.SERVED, end=t0 - pd.Timedelta(hours=1)).empty


# ------------------------------------------------------------------------------------------ landing
def test_landing_is_exactly_once_and_a_rerun_lands_the_same(log: L.EventLog) -> None:
    ds = log.test_dataset
    log.append_events(ds, [ev(f"e{i}", user=i) for i in range(5)])
    k1 = log.land(ds, L.EVENTS, "run-1")
    assert (k1.after, k1.rows, k1.new) == (0, 5, True)
    log.append_events(ds, [ev(f"e{i}", user=i) for i in range(5, 8)])
    again = log.land(ds, L.EVENTS, "run-1")  # re-run: the same range, not the new events
    assert (again.after, again.upto, again.rows, again.new) == (k1.after, k1.upto, 5, False)
    k2 = log.land(ds, L.EVENTS, "run-2")
    assert (k2.after, k2.rows) == (k1.upto, 3)
    assert log.land(ds, L.EVENTS, "run-3").rows == 0
    assert log.watermark(ds, L.EVENTS) == k2.upto == log.high_water(ds, L.EVENTS)
    assert [x["run_key"] for x in log.landings(ds)] == ["run-1", "run-2", "run-3"]
    landed = pd.concat([log.read(ds, L.EVENTS, k.after, k.upto) for k in (k1, k2)])
    assert sorted(landed["event_id"]) == sorted(f"e{i}" for i in range(8))


def test_landing_leaves_events_logged_after_the_interval_end(log: L.EventLog) -> None:
    ds = log.test_dataset
    log.append_events(ds, [ev("early-1"), ev("early-2", user=2)])
    time.sleep(0.01)
    end = pd.Timestamp.now(tz="UTC")
    time.sleep(0.01)
    log.append_events(ds, [ev("late-1", user=3)])
    first = log.land(ds, L.EVENTS, "day-1", cutoff=end)
    assert log.read(ds, L.EVENTS, first.after, first.upto)["event_id"].tolist() == ["early-1", "early-2"]
    second = log.land(ds, L.EVENTS, "day-2", cutoff=end + pd.Timedelta(days=1))
    assert log.read(ds, L.EVENTS, second.after, second.upto)["event_id"].tolist() == ["late-1"]


def test_concurrent_appends_land_exactly_once(log: L.EventLog) -> None:
    """Writers append while a lander keeps landing: every event lands in exactly one range."""
    ds, stop, errors = log.test_dataset, threading.Event(), []

    def writer(w: int) -> None:
        try:
            for i in range(40):
                log.append_events(ds, [ev(f"w{w}-{i}-{j}", user=w) for j in range(3)])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    ranges, n = [], 0
    while any(t.is_alive() for t in threads):
        ranges.append(log.land(ds, L.EVENTS, f"run-{n}"))
        n += 1
    for t in threads:
        t.join()
    ranges.append(log.land(ds, L.EVENTS, f"run-{n}"))
    assert not errors
    for prev, nxt in zip(ranges, ranges[1:]):
        assert nxt.after == prev.upto  # contiguous: no gap, no overlap
    landed = pd.concat([log.read(ds, L.EVENTS, r.after, r.upto) for r in ranges])
    assert len(landed) == 4 * 40 * 3 == landed["event_id"].nunique() == sum(r.rows for r in ranges)


def test_landed_frame_carries_the_log_position() -> None:
    records = pd.DataFrame({"seq": [5, 9], "event_id": ["a", "b"], S.USER_ID: [1, 2], S.ITEM_ID: [3, 4],
                            S.EVENT_TIMESTAMP: pd.to_datetime([1, 2], unit="s", utc=True)})
    frame = L.landed_frame(L.EVENTS, records, "books")
    assert frame["_file"].unique().tolist() == ["eventlog:books/events"] and frame["_line"].tolist() == [5, 9]


def test_open_log_needs_a_url_for_postgres(settings: Settings) -> None:
    with pytest.raises(L.EventLogError, match="LEARN_EVENTLOG__URL"):
        open_log(settings.with_overrides(eventlog={"backend": "postgres"}))
    with open_log(settings) as store:
        assert store.describe() == {"backend": "sqlite", "path": str(settings.paths.event_log())}


def test_cli_eventlog_status(settings: Settings) -> None:
    import json

    from typer.testing import CliRunner

    from learn_tasks import cli

    with open_log(settings) as store:
        store.append_events("synth", [ev("x"), ev("y", user=2)])
        store.land("synth", L.EVENTS, "run-1")
        store.append_events("synth", [ev("z", user=3)])
    res = CliRunner().invoke(cli.app, ["eventlog", "status", "--dataset", "synth", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["events"] == {"records": 3, "last_seq": 3, "landed_upto": 2, "not_landed": 1}
    assert [x["run_key"] for x in out["landings"]] == ["run-1"] and out["backend"] == "sqlite"


# ------------------------------------------------------------------------------------------ kill -9
CHILD = textwrap.dedent("""
    import sys
    from learn_tasks.data import eventlog as L
    from learn_tasks.data.eventlog_stores import SqliteLog
    log = SqliteLog(sys.argv[1])
    i = 0
    while True:
        batch = [L.Event(f"b{i}-{j}", i, j, 1_000_000 + i) for j in range(5)]
        log.append_events("ds", batch)  # returns once the batch is committed
        print(" ".join(e.event_id for e in batch), flush=True)  # the acknowledgement
        i += 1
""")


def test_sqlite_log_keeps_every_acknowledged_event_through_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "eventlog.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(acked) < 200 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked += line.split()
        os.kill(child.pid, signal.SIGKILL)  # mid-write, most likely
        acked += child.stdout.read().split()  # acknowledgements already written before the kill
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL and len(acked) >= 200
    log = SqliteLog(path)
    stored = set(log.read("ds", L.EVENTS)["event_id"])
    assert set(acked) <= stored  # nothing acknowledged is lost
    assert len(stored) % 5 == 0  # batches are all-or-nothing
    with log._tx() as cur:
        cur.execute("PRAGMA integrity_check")
        assert cur.fetchone()[0] == "ok"
    assert not log.append_events("ds", [ev("after-restart")])[0].duplicate
    log.close()


# ------------------------------------------------------------------------------------------ the pipeline
def _append_today(cfg: Settings, dataset: str, rows: list[tuple[str, int, int, pd.Timestamp]]) -> None:
    with open_log(cfg) as log:
        log.append_events(dataset, [L.Event(i, int(u), int(it), L.to_us(t)) for i, u, it, t in rows])


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.production)])
def test_log_events_land_validate_and_publish_exactly_once(request, settings: Settings, synth_dataset: str,
                                                           backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.orchestration import landing, runs

    if backend == "postgres":
        monkeypatch.setenv("LEARN_EVENTLOG__URL", request.getfixturevalue("pg_url"))
        settings = load_settings(overrides=["eventlog.backend=postgres"])
    cfg = settings.with_overrides(validate={"max_failed_share": 0.5, "data_docs": False})
    ds = synth_dataset
    inter, items = data.load_interactions(cfg, ds), data.load_items(cfg, ds)
    before = len(inter)
    users, known = inter[S.USER_ID].unique()[:4], items[S.ITEM_ID].to_numpy()[:4]
    now = pd.Timestamp.now(tz="UTC").floor("s")
    end = (now + pd.Timedelta(hours=1)).floor("h")
    with open_log(cfg) as log:
        new_item = log.save_item(ds, {S.TITLE: "Baking Bread at Home"}, floor=int(items[S.ITEM_ID].max())).item_id
    _append_today(cfg, ds, [("a", users[0], known[0], now - pd.Timedelta(minutes=3)),
                            ("b", users[1], known[1], now - pd.Timedelta(minutes=2)),
                            ("c", users[2], new_item, now - pd.Timedelta(minutes=1)),  # an item added online
                            ("d", users[3], 999_999, now),  # appended without the service's check
                            ("e", users[0], known[2], now - pd.Timedelta(days=3))])  # older than the window
    # A file dropped in incoming/ still lands beside the log.
    incoming = cfg.paths.incoming(ds)
    incoming.mkdir(parents=True)
    pd.DataFrame({S.USER_ID: [users[1]], S.ITEM_ID: [known[3]], S.EVENT_TIMESTAMP: [int(now.timestamp()) - 30]}).to_csv(
        incoming / "interactions-app.csv", index=False)

    a = runs.RunArgs(ds, runs.INCREMENTAL, end - pd.Timedelta(days=1), end)
    landed = landing.land_logs(cfg, a)
    assert landed["event_log"]["events"]["rows"] == 5 and landed["event_log"]["items"]["rows"] == 1
    assert landed["rows"] == {"interactions": 6, "items": 1}
    summary = landing.validate_logs(cfg, a)
    vi = summary["interactions"]
    assert (vi["read"], vi["accepted"]) == (6, 4)
    assert vi["by_check"] == {"known_item": 1, "timestamp_in_interval": 1}
    q = pd.read_parquet(cfg.paths.quarantine() / ds / a.key / "interactions.parquet")
    assert set(q[S.QUARANTINE_FILE]) == {f"eventlog:{ds}/events"}  # traced to the log record: line = seq
    with open_log(cfg) as log:
        seqs = log.read(ds, L.EVENTS).set_index("event_id")["seq"]
    assert sorted(q[S.QUARANTINE_LINE]) == sorted(seqs[["d", "e"]].tolist())
    after = data.load_interactions(cfg, ds)
    assert len(after) == before + 4 and new_item in set(data.load_items(cfg, ds)[S.ITEM_ID])

    # Re-running the interval lands the same records and publishes nothing twice.
    _append_today(cfg, ds, [("f", users[2], known[0], now)])
    assert landing.land_logs(cfg, a)["event_log"]["events"] == {**landed["event_log"]["events"], "new": False}
    assert landing.validate_logs(cfg, a)["published"]["changed"] is False
    assert len(data.load_interactions(cfg, ds)) == before + 4
    # The next run lands only what came after: each event once.
    b = runs.RunArgs(ds, runs.INCREMENTAL, a.start + pd.Timedelta(hours=1), a.end + pd.Timedelta(hours=1))
    assert landing.land_logs(cfg, b)["event_log"]["events"]["rows"] == 1
    landing.validate_logs(cfg, b)
    final = data.load_interactions(cfg, ds)
    assert len(final) == before + 5
    key = [S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]
    assert not final.duplicated(key).any()
    c = runs.RunArgs(ds, runs.INCREMENTAL, b.start + pd.Timedelta(hours=1), b.end + pd.Timedelta(hours=1))
    assert landing.land_logs(cfg, c)["event_log"]["events"]["rows"] == 0


def test_item_ingest_lands_items_added_online(settings: Settings, synth_dataset: str) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.orchestration import ingest, runs

    cfg = settings.with_overrides(validate={"data_docs": False})
    end = pd.Timestamp.now(tz="UTC").ceil("min")
    a = runs.RunArgs(synth_dataset, runs.INGEST, end - pd.Timedelta(minutes=15), end)
    assert ingest.land_items(cfg, a) == {}  # nothing new: the run short-circuits
    with open_log(cfg) as log:
        saved = log.save_item(synth_dataset, {S.TITLE: "Rockets and Planets", S.SOURCE_ID: "isbn-42"}, floor=10**5)
    landed = ingest.land_items(cfg, a)
    assert landed["event_log"]["items"]["rows"] == 1
    ingest.validate_items(cfg, a)
    items = data.load_items(cfg, synth_dataset).set_index(S.ITEM_ID)
    assert items.loc[saved.item_id, S.SOURCE_ID] == "isbn-42" and items.loc[saved.item_id, S.TITLE] == "Rockets and Planets"
    b = runs.RunArgs(synth_dataset, runs.INGEST, end, end + pd.Timedelta(minutes=15))
    assert ingest.land_items(cfg, b) == {}
    assert np.isin(saved.item_id, data.load_items(cfg, synth_dataset)[S.ITEM_ID]).sum() == 1
