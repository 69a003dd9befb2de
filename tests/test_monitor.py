"""Monitoring: thresholds -> alerts, slices, Evidently reports, workspace snapshots, dashboard, CLI and DAG.

Generated data (learn_tasks.data.synth) with no shift must raise no alert; each injected shift (a surge of new
items, consumption collapsing onto head items, new items about another topic, a drop in a slice's
quality) must raise its own alert. Content embeddings in the fast tests are built from the synthetic
topics (one direction per topic plus noise), as a text encoder would place them; the integration test
encodes item titles with the real packaged encoder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import free_port
from learn_tasks.data import datasets as data
from learn_tasks.monitoring import dashboard, frames, monitor, quality, rules
from learn_tasks.data import splits, synth
from learn_tasks import schema as S
from learn_tasks.config import Settings, load_settings
from learn_tasks.storage import read_json, write_json

SPEC = synth.SynthSpec(n_users=300, n_items=400, cold_items=0.25, seed=0)
DIM = 16


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _settings(home: Path, **monitor_overrides) -> Settings:
    cfg = load_settings(env={"LEARN_HOME": str(home)})
    return cfg.with_overrides(monitor={"eval_model": "", **monitor_overrides})


def _prepare(cfg: Settings, folder: Path, name: str, mutate=None) -> str:
    """Prepare the generated data as ``name``; ``mutate(inter, items, late)`` may change the late events."""
    src = synth.write_seqrec(folder / name, SPEC)
    inter = pd.read_csv(src / "interactions.csv")
    items = pd.read_csv(src / "items.csv")
    if mutate is not None:
        late = inter["timestamp"] >= inter["timestamp"].quantile(0.92)  # well inside the test window
        inter, items = mutate(inter, items, late.to_numpy())
        inter.to_csv(src / "interactions.csv", index=False)
        items.to_csv(src / "items.csv", index=False, quoting=1)
    data.prepare_dataset(cfg, "seqrec", src, name)
    return name


def _topic_embeddings(item_ids: np.ndarray, topics: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = np.eye(DIM, dtype=np.float32)[topics] + rng.normal(0, 0.35, (len(item_ids), DIM)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _synth_embeddings() -> tuple[np.ndarray, np.ndarray]:
    _, items = synth.make(SPEC)
    topics = items[S.CATEGORY].map({t.title(): i for i, t in enumerate(synth.TOPICS)}).to_numpy()
    return items[S.ITEM_ID].to_numpy(np.int64), _topic_embeddings(items[S.ITEM_ID].to_numpy(), topics)


def _kinds(result: dict) -> set[tuple[str, str]]:
    return {(a["slice"], a["metric"]) for a in result["alerts"]}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "learn_home"


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------
def test_check_thresholds_names_slice_metric_value_threshold() -> None:
    mc = load_settings(env={}).monitor.model_copy(update={"quality_drop_max": 0.5})
    values = {"cold_start.event_share": 0.6, "long_tail.event_share": 0.05, "all.popularity_drift": 0.1,
              "all.recall@10": 0.04, "head.recall@10": 0.3}
    previous = {"all.recall@10": 0.2, "head.recall@10": 0.31, "cold_start.event_share": 0.1}
    limits = rules.thresholds(mc, previous)
    assert limits["cold_start.event_share.max"] == 0.45
    assert limits["all.recall@10.min"] == pytest.approx(0.1)  # 0.2 * (1 - 0.5)
    assert "cold_start.event_share.min" not in limits  # only quality metrics get relative floors
    alerts = rules.check_thresholds(values, limits, mc, previous)
    got = {(a["slice"], a["metric"]): a for a in alerts}
    assert set(got) == {("cold_start", "event_share"), ("long_tail", "event_share"), ("all", "recall@10")}
    a = got[("cold_start", "event_share")]
    assert (a["value"], a["threshold"], a["kind"]) == (0.6, 0.45, "max")
    for part in ("cold_start", "event_share", "0.6", "0.45"):
        assert part in a["message"]
    b = got[("long_tail", "event_share")]
    assert (b["value"], b["threshold"], b["kind"]) == (0.05, 0.1, "min")
    assert "below" in b["message"] and "above" in a["message"]
    assert "previous run 0.2" in got[("all", "recall@10")]["message"]
    # unmeasured values and switched-off thresholds raise nothing
    off = mc.model_copy(update={"cold_start_share_max": None})
    assert "cold_start.event_share.max" not in rules.thresholds(off)
    assert rules.check_thresholds({}, rules.thresholds(mc), mc) == []


def test_item_slices_and_event_frame_hand_computed() -> None:
    t0 = pd.Timestamp("2020-01-01", tz="UTC")
    # training popularity: item 1 -> 6 events, item 2 -> 3, item 3 -> 1; 10 events in all
    ref = pd.DataFrame({S.USER_ID: np.arange(10), S.ITEM_ID: [1] * 6 + [2] * 3 + [3],
                        S.EVENT_TIMESTAMP: [t0] * 10})
    items = frames.item_table(ref, np.array([1, 2, 3, 4]), tail_share=0.2)
    # tail: ascending popularity 3 (1), 2 (3): running totals 1, 4 -> within 0.2 * 10 = 2 is item 3 only
    assert items[S.IS_LONG_TAIL].to_dict() == {1: False, 2: False, 3: True, 4: False}
    assert items[S.IS_COLD_START].to_dict() == {1: False, 2: False, 3: False, 4: True}
    cur = pd.DataFrame({S.ITEM_ID: [4, 4, 3, 1, 2, 5]})  # item 5 is not even in the catalogue: cold
    ev = frames.event_frame(cur, items)
    assert ev["is_cold_start"].mean() == pytest.approx(3 / 6)
    assert ev["is_long_tail"].mean() == pytest.approx(1 / 3)  # among the 3 warm events
    assert ev["is_head"].mean() == pytest.approx(2 / 3)
    assert ev["log_popularity"].dropna().tolist() == pytest.approx(np.log1p([1, 6, 3]).tolist())


def test_user_frame_and_windows(home: Path) -> None:
    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    split = splits.load_split(cfg, name, S.PROTOCOL_TEMPORAL)
    w = frames.windows(split)
    assert w.start == pd.Timestamp(split.attrs["test_cutoff"])
    assert len(w.current) == int((split[S.SPLIT] == S.TEST).sum())
    assert (w.reference[S.SPLIT] == S.TRAIN).all() and w.reference[S.EVENT_TIMESTAMP].max() < w.start
    assert w.recent_start == w.reference_end - (w.end - w.start)
    explicit = frames.windows(split, "2020-06-01", "2020-07-01")
    assert explicit.current[S.EVENT_TIMESTAMP].between(pd.Timestamp("2020-06-01", tz="UTC"),
                                                       pd.Timestamp("2020-07-01", tz="UTC"), inclusive="left").all()
    assert explicit.reference[S.EVENT_TIMESTAMP].max() < pd.Timestamp("2020-06-01", tz="UTC")
    with pytest.raises(ValueError, match="empty"):
        frames.windows(split, "2020-07-01", "2020-06-01")
    t = pd.Timestamp("2020-01-01", tz="UTC")
    window = pd.DataFrame({S.USER_ID: [1, 1, 2], S.ITEM_ID: [9, 9, 9], S.EVENT_TIMESTAMP: [t] * 3})
    history = pd.DataFrame({S.USER_ID: [1] * 5 + [2], S.ITEM_ID: [9] * 6, S.EVENT_TIMESTAMP: [t] * 6})
    training = history.iloc[:3]  # user 1 has 3 training events, user 2 none
    uf = frames.user_frame(window, history, known_users=np.array([1]), cold_user_max_events=3, training=training)
    assert uf.to_dict("list") == {"events_in_window": [2.0, 1.0], "sequence_length": [5.0, 1.0],
                                  "is_new_user": [0.0, 1.0], "is_cold_user": [1.0, 1.0]}


def test_eval_values_reads_the_evaluation_format() -> None:
    metrics = {"all": {"recall@10": 0.2, "ndcg@10": 0.1, "mrr": 0.05, "cases": 10},
               "cold_start": {"recall@10": 0.01, "hr@10": 0.01},
               "coverage": {"coverage@10": 0.3, "cold_start_share@10": 0.02, "long_tail_share@10": 0.07},
               "popularity_buckets": [{"bucket": "0", "recall@10": 0.0}], "meta": {"model": "learn"},
               "scores": {"all": {"p50": 0.4, "p90": 0.8}}}
    assert quality.eval_values(metrics, 10) == {
        "all.recall@10": 0.2, "all.ndcg@10": 0.1, "all.mrr": 0.05, "cold_start.recall@10": 0.01,
        "cold_start.hr@10": 0.01, "all.coverage@10": 0.3, "cold_start.exposure@10": 0.02,
        "long_tail.exposure@10": 0.07, "all.score_p50": 0.4, "all.score_p90": 0.8}


def test_dashboard_definition_builds_named_panels() -> None:
    mc = load_settings(env={}).monitor
    limits = rules.thresholds(mc)
    model = dashboard.dashboard_model(dashboard.load_dashboard_spec(), limits, mc)
    titles = [p.title for p in model.panels]
    assert [t.title for t in model.tabs] == ["Overview", "Cold-start", "Long-tail", "Live traffic"]
    assert any(t.startswith("Cold-start: share of events") for t in titles)
    assert any(t.startswith("Long-tail: share of warm-item events") for t in titles)
    assert "Cold-start: exposure in the top-10" in titles
    text = next(p for p in model.panels if p.title == "Alert thresholds")
    assert "cold_start.event_share.max = 0.45" in text.subtitle
    columns = {v.metric_labels["column"] for p in model.panels for v in p.values}
    assert {"cold_start.event_share", "cold_start.event_share.max", "long_tail.event_share",
            "long_tail.event_share.min", "cold_start.embedding_drift", "online.fallback_share",
            "online.fallback_share.max", "online.latency_ms_p99", "online.hit_rate"} <= columns


# --------------------------------------------------------------------------------------------------
# end to end on generated data
# --------------------------------------------------------------------------------------------------
def test_no_shift_no_alert_and_outputs_load(home: Path) -> None:
    from evidently import Report  # noqa: F401  (the snapshot classes below need the package loaded)
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Workspace

    from learn_tasks.evaluation import harness

    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    harness.evaluate_run(cfg, name, S.PROTOCOL_TEMPORAL, model="popular")  # the real evaluation output format
    res = monitor.monitor_window(cfg, name, embeddings=_synth_embeddings(), run_id="r1", run_date="2024-05-01")
    assert res["alerts"] == [], res["alerts"]
    v = res["values"]
    assert 0 < v["cold_start.event_share"] < 0.45 and 0.1 < v["long_tail.event_share"] < 0.6
    assert v["cold_start.embedding_drift"] < 0.75 and v["cold_start.items_encoded"] >= 20
    assert v["all.recall@10"] > 0 and "cold_start.exposure@10" in v and "all.coverage@10" in v
    out = home / "reports" / "monitoring" / "2024-05-01" / name
    assert Path(res["report"]) == out / "report.html" and Path(res["summary"]) == out / "summary.json"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Alerts (0)" in page and "cold_start.event_share" in page
    assert read_json(out / "summary.json")["values"] == json.loads(json.dumps(v))
    assert sorted(res["sections"]) == ["content", "interactions", "users"] and not (out / "summary.html").exists()
    for section in ("summary", "interactions", "users", "content"):
        if section != "summary":  # the summary is the page's table; its snapshot is in the workspace
            assert (out / f"{section}.html").stat().st_size > 10_000 and f"src='{section}.html'" in page
        snap = Snapshot.load(out / "snapshots" / f"{section}.json")
        assert snap.dict()["metrics"], section
    # the workspace has the project, one snapshot per section, and the dashboard
    ws = Workspace(str(home / "evidently"))
    project = ws.search_project("learn monitoring: synth")[0]
    assert str(project.id) == res["project_id"]
    assert sorted(map(str, ws.list_runs(project.id))) == sorted(res["snapshots"])
    summary = ws.get_run(project.id, res["snapshots"][0])
    assert summary.tags == ["summary"] and summary.metadata["run_id"] == "r1"
    dash = ws.get_dashboard(project.id)
    assert {"Cold-start", "Long-tail"} <= {t.title for t in dash.tabs}


def test_surge_of_new_items_raises_the_cold_start_alert(home: Path) -> None:
    def surge(inter, items, late):
        rng = np.random.default_rng(3)
        new_ids = np.arange(9000, 9100)
        hit = late & (rng.random(len(inter)) < 0.8)
        inter.loc[hit, "item_id"] = rng.choice(new_ids, hit.sum())
        extra = pd.DataFrame({"item_id": new_ids, "title": [f"Brand New Release {i}" for i in new_ids]})
        return inter, pd.concat([items, extra], ignore_index=True)

    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "surge", surge)
    res = monitor.monitor_window(cfg, name, embeddings=_synth_embeddings())
    assert _kinds(res) == {("cold_start", "event_share")}, res["alerts"]
    alert = res["alerts"][0]
    assert alert["value"] > 0.45 and alert["threshold"] == 0.45
    assert any("not encoded yet" in n for n in res["notes"])  # the new items have no embedding yet


def test_popularity_collapse_onto_head_items_raises_the_long_tail_alert(home: Path) -> None:
    def collapse(inter, items, late):
        rng = np.random.default_rng(4)
        top = inter.loc[~late, "item_id"].value_counts().index[:5].to_numpy()
        hit = late & (rng.random(len(inter)) < 0.9)
        inter.loc[hit, "item_id"] = rng.choice(top, hit.sum())
        return inter, items

    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "collapse", collapse)
    res = monitor.monitor_window(cfg, name, embeddings=_synth_embeddings())
    kinds = _kinds(res)
    assert ("long_tail", "event_share") in kinds, res["alerts"]
    assert not any(slc == "cold_start" for slc, _ in kinds)
    lt = next(a for a in res["alerts"] if a["slice"] == "long_tail")
    assert lt["value"] < 0.1 and lt["threshold"] == 0.1 and lt["kind"] == "min"


def test_new_items_about_another_topic_raise_the_embedding_alert(home: Path) -> None:
    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    ids, emb = _synth_embeddings()
    w = frames.windows(splits.load_split(cfg, name, S.PROTOCOL_TEMPORAL))
    items = frames.item_table(w.reference, ids, cfg.evaluate.tail_share)
    new = np.isin(ids, w.current[S.ITEM_ID]) & items[S.IS_COLD_START].reindex(ids).to_numpy(bool)
    assert new.sum() >= 20
    shifted = emb.copy()
    shifted[new] = _topic_embeddings(ids[new], np.full(new.sum(), DIM - 1), seed=7)  # a topic never seen
    res = monitor.monitor_window(cfg, name, embeddings=(ids, shifted))
    assert _kinds(res) == {("cold_start", "embedding_drift")}, res["alerts"]
    assert res["alerts"][0]["value"] > 0.9


def test_quality_drop_between_runs_and_rerun_replaces_snapshots(home: Path) -> None:
    from evidently.ui.workspace import Workspace

    cfg = _settings(home, quality_drop_max=0.5)
    name = _prepare(cfg, home.parent, "synth")
    path = home / "reports" / "eval" / name / "learn-run-test" / "metrics.json"
    base = {"all": {"recall@10": 0.2, "ndcg@10": 0.1}, "cold_start": {"recall@10": 0.08, "ndcg@10": 0.04},
            "coverage": {"coverage@10": 0.3, "cold_start_share@10": 0.05, "long_tail_share@10": 0.1},
            "meta": {"dataset": name, "stage": "test", "model": "learn", "created": "2024-01-01T00:00:00"}}
    write_json(base, path)
    first = monitor.monitor_window(cfg, name, run_id="day1")
    assert first["alerts"] == [] and first["values"]["cold_start.recall@10"] == 0.08
    worse = json.loads(json.dumps(base))
    worse["cold_start"]["recall@10"] = 0.02
    worse["meta"]["created"] = "2024-01-02T00:00:00"
    write_json(worse, path)
    second = monitor.monitor_window(cfg, name, run_id="day2")
    assert _kinds(second) == {("cold_start", "recall@10")}
    alert = second["alerts"][0]
    assert alert["value"] == 0.02 and alert["threshold"] == pytest.approx(0.04)
    assert second["previous"]["cold_start.recall@10"] == 0.08
    with pytest.raises(rules.MonitoringAlert, match=r"slice cold_start: recall@10 = 0.02 is below"):
        rules.raise_for_alerts(second)
    # re-running day2 replaces its snapshots instead of adding a third point
    ws = Workspace(str(home / "evidently"))
    pid = second["project_id"]
    n = len(ws.list_runs(pid))
    again = monitor.monitor_window(cfg, name, run_id="day2")
    assert len(ws.list_runs(pid)) == n
    assert set(map(str, ws.list_runs(pid))) >= set(again["snapshots"])
    assert sorted(read_json(dashboard.history_path(cfg, name))["runs"]) == ["day1", "day2"]
    assert again["previous"]["cold_start.recall@10"] == 0.08  # still compared with day1, not itself


def test_missing_evaluation_and_embeddings_are_notes(home: Path) -> None:
    cfg = _settings(home, eval_model="learn")
    name = _prepare(cfg, home.parent, "synth")
    res = monitor.monitor_window(cfg, name)
    assert res["alerts"] == []
    text = " ".join(res["notes"])
    assert "no evaluation of model 'learn'" in text and "embedding drift left out" in text
    assert "cold_start.embedding_drift" not in res["values"] and "all.recall@10" not in res["values"]


def test_eval_model_default_tracks_the_promoted_kind_else_pipeline_model(home: Path) -> None:
    from learn_tasks.pch import registry

    cfg = load_settings(env={"LEARN_HOME": str(home)})
    assert cfg.monitor.eval_model is None
    name = "synth"
    for kind, created in (("sasrec", "2024-01-01"), (cfg.pipeline.model, "2024-01-02"), ("learn", "2024-01-03")):
        write_json({"all": {"recall@10": 0.1}, "meta": {"dataset": name, "stage": "test", "model": kind,
                                                        "created": created}},
                   cfg.paths.reports("eval") / name / f"eval-{kind}" / "metrics.json")
    # nothing promoted: the kind the pipeline trains
    path, metrics, note = quality.latest_eval(cfg, name)
    assert note is None and metrics["meta"]["model"] == cfg.pipeline.model
    # a promoted run of another kind: its evaluation is tracked
    run_dir = cfg.paths.dataset_models(name) / "20240101T000000-sasrec-abc123"
    write_json({"kind": "sasrec", "dataset": name, "created": "2024-01-01T00:00:00"}, run_dir / registry.META)
    write_json({"kind": "sasrec"}, run_dir / "config.json")  # the checkpoint's own config names its kind
    registry.promote(cfg, name, run_dir)
    path, metrics, note = quality.latest_eval(cfg, name)
    assert note is None and metrics["meta"]["model"] == "sasrec" and path.parent.name == "eval-sasrec"
    # an explicit kind wins; "" tracks any kind (the newest evaluation)
    assert quality.latest_eval(cfg.with_overrides(monitor={"eval_model": "learn"}), name)[1]["meta"]["model"] == "learn"
    assert quality.latest_eval(cfg.with_overrides(monitor={"eval_model": ""}), name)[1]["meta"]["model"] == "learn"


def test_thin_and_empty_windows_are_reported_not_alerted(home: Path) -> None:
    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    small = monitor.monitor_window(cfg, name, "2020-12-20T05:00:00", "2020-12-20T06:00:00")  # one event
    assert small["values"]["all.events"] >= 1 and small["alerts"] == []
    assert any("monitor.min_rows" in n for n in small["notes"])
    empty = monitor.monitor_window(cfg, name, "2022-01-01", "2022-01-02")
    assert _kinds(empty) == {("all", "events")} and Path(empty["report"]).exists()


def test_cli_monitor_json(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from learn_tasks.cli import app

    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    monkeypatch.setenv("LEARN_HOME", str(home))
    res = CliRunner().invoke(app, ["monitor", "--dataset", name, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["alerts"] == [] and Path(out["report"]).exists()
    bad = CliRunner().invoke(app, ["monitor", "--dataset", "nope", "--json"])
    assert bad.exit_code == 2 and "not prepared" in bad.output


def test_dag_is_thin_daily_and_documented() -> None:
    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[1] / "dags"
    bag = DagBag(dag_folder=str(dags / "learn_monitoring.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["learn_monitoring"]
    assert dag.catchup is False and dag.start_date is not None and "monitoring" in dag.tags
    assert dag.doc_md and "learn monitor ui" in dag.doc_md
    assert [t.task_id for t in dag.tasks] == ["monitor"]
    assert dag.tasks[0].retries >= 1
    assert set(dag.params.keys()) == {"dataset", "window", "fail_on_alert"}
    source = (dags / "learn_monitoring.py").read_text(encoding="utf-8")
    head = source.split("def learn_monitoring")[0]
    ours = [line for line in head.splitlines() if "import" in line and "learn_tasks" in line]
    # the stage loads in the task; the schedule's release asset comes from the light task helper
    assert ours == ["from learn_tasks.orchestration.dag_tasks import default_args, release_asset, stage_task"]


# --------------------------------------------------------------------------------------------------
# integration: real encoder, Airflow's runner, the Evidently UI
# --------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_change_in_item_text_topics_with_the_real_encoder(home: Path) -> None:
    """New items titled about one unseen theme, encoded by the packaged text encoder -> embedding alert."""
    from learn_tasks.ceg import encode

    cfg = _settings(home)
    base = _prepare(cfg, home.parent, "synth")
    w = frames.windows(splits.load_split(cfg, base, S.PROTOCOL_TEMPORAL))
    items = data.load_items(cfg, base)
    table = frames.item_table(w.reference, items[S.ITEM_ID].to_numpy(), cfg.evaluate.tail_share)
    new_ids = set(np.unique(w.current[S.ITEM_ID])) & set(table.index[table[S.IS_COLD_START]])

    def retitle(inter, its, late):
        words = ["Submarine", "Volcano", "Glacier", "Coral Reef", "Deep Sea", "Tectonic", "Tsunami", "Iceberg"]
        mask = its["item_id"].isin(new_ids)
        its.loc[mask, "title"] = [f"{words[i % 8]} Geology and {words[(i + 3) % 8]} Science"
                                  for i in range(int(mask.sum()))]
        return inter, its

    shifted = _prepare(cfg, home.parent, "retitled", retitle)
    results = {}
    for name in (base, shifted):
        encode.encode_catalogue(cfg, name)
        results[name] = monitor.monitor_window(cfg, name)
    assert _kinds(results[base]) == set(), results[base]["alerts"]
    assert ("cold_start", "embedding_drift") in _kinds(results[shifted]), results[shifted]["values"]


@pytest.mark.integration
def test_dag_run_fails_on_alert_and_succeeds_without(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from learn_tasks.orchestration import airflow_env, runner

    monkeypatch.setenv("LEARN_HOME", str(home))
    cfg = _settings(home)

    def collapse(inter, items, late):
        top = inter.loc[~late, "item_id"].value_counts().index[:3].to_numpy()
        inter.loc[late, "item_id"] = np.resize(top, late.sum())
        return inter, items

    _prepare(cfg, home.parent, "synth")
    _prepare(cfg, home.parent, "collapse", collapse)
    monkeypatch.setenv("LEARN_MONITOR__EVAL_MODEL", "")
    airflow_env.configure_airflow(cfg.paths.airflow())
    dag = runner.load_dag("learn_monitoring")
    ok = dag.test(run_conf={"dataset": "synth", "window": "split", "fail_on_alert": True})
    assert str(ok.state).endswith("success")
    bad = dag.test(run_conf={"dataset": "collapse", "window": "split", "fail_on_alert": True},
                   logical_date=pd.Timestamp("2024-03-02", tz="UTC").to_pydatetime())
    assert str(bad.state).endswith("failed")
    days = sorted((home / "reports" / "monitoring").glob("*/collapse/summary.json"))
    assert days and read_json(days[-1])["alerts"][0]["slice"] == "long_tail"


@pytest.mark.integration
def test_ui_serves_the_dashboard_series_after_two_runs(home: Path) -> None:
    import httpx

    cfg = _settings(home)
    name = _prepare(cfg, home.parent, "synth")
    res = [monitor.monitor_window(cfg, name, embeddings=_synth_embeddings()) for _ in range(2)]
    port = free_port()
    env = {**os.environ, "LEARN_HOME": str(home), "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "learn_tasks.cli", "monitor", "ui", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/api/version", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pid = res[-1]["project_id"]
        dash = httpx.get(f"{base}/api/v2/dashboards/{pid}").json()
        titles = {p["title"] for p in dash["panels"]}
        assert "Cold-start: share of events on items with no training event" in titles
        assert "Long-tail: share of warm-item events on long-tail items" in titles
        body = {"series_filter": [{"tags": ["summary"], "metadata": {}, "metric": "evidently:metric_v2:MeanValue",
                                   "metric_labels": {"column": c}}
                                  for c in ("cold_start.event_share", "long_tail.event_share")]}
        series = httpx.post(f"{base}/api/v2/snapshots/{pid}/data_series_batch", json=body).json()["series"]
        points = {s["params"]["column"]: s["values"] for s in series}
        assert len(points["cold_start.event_share"]) == 2 and len(points["long_tail.event_share"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
