"""The pipeline: promotion rule, run arguments, landing/validation/publishing, failure notes, and the whole
``learn_pipeline`` DAG run end to end by Airflow's own runner on generated data (twice: idempotence)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.ceg import store
from learn_tasks.config import Settings
from learn_tasks.orchestration import gate, landing, runner, runs, stages, tasks


# ------------------------------------------------------------------------------------------- gate
@pytest.mark.parametrize("candidate, current, promote", [
    (0.10, None, True),  # nothing promoted yet
    (0.10, 0.10, True),  # equal
    (0.0985, 0.10, True),  # 1.5% worse: inside the 2% margin (floor 0.098)
    (0.098, 0.10, True),  # exactly at the floor
    (0.0979, 0.10, False),  # 2.1% worse
    (None, 0.10, False),  # a candidate without a score is never promoted over a model
    (0.2, 0.1, True),
])
def test_gate_rule(candidate, current, promote) -> None:
    ok, reason = gate.decide(candidate, current, margin=0.02)
    assert ok is promote
    if not ok and candidate is not None:
        assert "keeping the current model" in reason and "0.0980" in reason


def test_slice_conditions_block_only_a_loss_beyond_the_margin_that_chance_does_not_explain() -> None:
    """Hand-made ranks on 400 cases: 100 cold-start, 100 long-tail, 200 head. recall@10 = rank < 10."""
    masks = {"cold_start": np.r_[np.ones(100, bool), np.zeros(300, bool)],
             "long_tail": np.r_[np.zeros(100, bool), np.ones(100, bool), np.zeros(200, bool)],
             "head": np.r_[np.zeros(200, bool), np.ones(200, bool)], "cold_users": np.zeros(400, bool)}
    cur = np.full(400, 50)
    cur[:60] = 0  # current: cold-start recall@10 0.60
    cur[100:150] = 0  # long-tail 0.50
    cand = cur.copy()
    cand[:60] = 50
    cand[:20] = 0  # candidate: cold-start 0.20, a loss far beyond chance and margin
    cand[100:148] = 0
    cand[148:150] = 50  # long-tail 0.48: 2 cases of 100 lost, within what chance gives
    by = gate.slice_conditions(cand, cur, masks, ["cold_start", "long_tail", "cold_users"], "recall@10",
                               margin=0.02, min_cases=30, n_boot=500)
    assert by["cold_start"]["candidate"] == pytest.approx(0.2) and by["cold_start"]["current"] == pytest.approx(0.6)
    assert by["cold_start"]["floor"] == pytest.approx(0.588)
    assert by["cold_start"]["difference"]["mean"] == pytest.approx(-0.4) and by["cold_start"]["status"] == "failed"
    lt = by["long_tail"]
    assert lt["difference"]["hi"] > lt["floor"] - lt["current"] and lt["status"] == "passed"
    assert by["cold_users"]["cases"] == 0 and by["cold_users"]["status"] == "skipped"
    reason = gate.slice_reason(by, "recall@10")
    assert reason.startswith("the candidate is worse on cold_start recall@10 0.2000 vs 0.6000") and "long_tail" not in reason
    assert gate.slice_reason({"long_tail": lt}, "recall@10") is None
    # too few cases: reported, never enforced, even for a total loss
    few = gate.slice_conditions(np.full(400, 50), cur, masks, ["cold_start"], "recall@10", 0.02, min_cases=101)
    assert few["cold_start"]["status"] == "skipped"


# ----------------------------------------------------------------------------------------- run args
def test_run_args_from_params(settings: Settings) -> None:
    a = runs.RunArgs.from_params(settings, {"dataset": "synth", "mode": "incremental", "window_days": 3,
                                         "epochs": "2", "budget_s": None},
                              "2021-01-01T00:00:00+00:00", "2021-01-02T00:00:00+00:00")
    assert a.key == "synth_20210101T000000Z_20210102T000000Z_incremental"
    assert a.accept_from == pd.Timestamp("2020-12-30", tz="UTC")
    assert a.epochs == 2 and a.budget_s is None
    full = runs.RunArgs.from_params(settings, {}, None, "2021-01-02")
    assert full.dataset == settings.pipeline.dataset and full.mode == settings.pipeline.scheduled_mode == "incremental"
    assert full.start == pd.Timestamp("2021-01-01", tz="UTC") and full.accept_from is not None
    full = runs.RunArgs.from_params(settings, {"mode": "full"}, None, "2021-01-02")
    assert full.accept_from is None  # a full run accepts the whole history
    with pytest.raises(runs.PipelineError, match="mode must be one of"):
        runs.RunArgs.from_params(settings, {"mode": "sometimes"}, None, "2021-01-02")
    # the candidate kind: the config's default unless the run names one
    assert full.model is None and full.kind(settings) == settings.pipeline.model == "learn_hybrid"
    assert runs.RunArgs.from_params(settings, {"model": "sasrec"}, None, "2021-01-02").kind(settings) == "sasrec"
    with pytest.raises(runs.PipelineError, match="model must be one of"):
        runs.RunArgs.from_params(settings, {"model": "gpt"}, None, "2021-01-02")
    # --date D runs the interval [D, D+1): Airflow's manual run at D+1 00:00 UTC
    assert runner.logical_date_for("2021-01-01").isoformat() == "2021-01-02T00:00:00+00:00"


@pytest.mark.parametrize("window_days", [0, -3])
def test_run_args_reject_a_window_shorter_than_a_day(settings: Settings, window_days: int) -> None:
    with pytest.raises(runs.PipelineError, match="window_days must be >= 1"):
        runs.RunArgs(dataset="synth", mode="incremental", start=pd.Timestamp("2021-01-01", tz="UTC"),
                     end=pd.Timestamp("2021-01-02", tz="UTC"), window_days=window_days)
    with pytest.raises(runs.PipelineError, match="window_days must be >= 1"):
        runs.RunArgs.from_params(settings, {"mode": "incremental", "window_days": window_days}, None, "2021-01-02")
    assert runs.RunArgs.from_params(settings, {"mode": "incremental"}, None, "2021-01-02").window_days == 1


def test_gate_scores_the_promoted_model_as_the_kind_it_is(settings: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate is a learn_hybrid; the promoted model a sasrec. The gate must score the promoted
    model as a sasrec (scoring it as the candidate's kind reads the wrong network and features)."""
    promoted = tmp_path / "models" / "synth" / "20210101T000000Z-sasrec-abc123"
    promoted.mkdir(parents=True)
    (promoted / "config.json").write_text(json.dumps({"kind": "sasrec"}))
    candidate = tmp_path / "models" / "synth" / "20210102T000000Z-learn_hybrid-def456"
    candidate.mkdir(parents=True)
    scored: list[tuple[str, str]] = []

    def fake_score(cfg, dataset, protocol, kind, run_dir, sample):
        scored.append((kind, str(run_dir)))
        return {settings.pipeline.gate_metric: 0.5, "cached": False}

    monkeypatch.setattr(gate.registry, "promoted", lambda cfg, dataset: promoted)
    monkeypatch.setattr(gate.registry, "promote", lambda *args, **kwargs: None)
    monkeypatch.setattr(gate.gate_sample, "load_sample", lambda cfg, dataset: SimpleNamespace(digest="s1"))
    monkeypatch.setattr(gate.gate_sample, "score", fake_score)
    cfg = settings.with_overrides(home=str(tmp_path))
    a = runs.RunArgs.from_params(cfg, {"dataset": "synth", "model": "learn_hybrid"}, None, "2021-01-02")
    res = gate.promotion_gate(cfg, a, {"run_dir": str(candidate)},
                              {"valid": {cfg.pipeline.gate_metric: 0.1, "sample": "s1"}})
    assert scored == [("sasrec", str(promoted))]
    assert res["previous_score"] == 0.5 and res["promoted"] is False  # 0.1 is far below 0.5


def test_gate_keeps_a_candidate_out_that_loses_the_cold_start_slice_within_the_overall_margin(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1000 cases, 15 of them cold-start: the candidate misses every cold-start target the current model
    hits. Overall recall@200 0.985 vs 1.0 is inside the 2% margin; the cold-start slice condition is not."""
    from learn_tasks.evaluation import gate_sample

    n, cold = 1000, 15
    sample = gate_sample.FixedSample(
        user_ids=np.arange(n), hist_offsets=np.arange(n + 1) * 5, hist_items=np.zeros(5 * n, np.int64),
        target_items=np.arange(n), train_events=np.full(n, 5), catalogue=np.arange(n), meta={"digest": "s1"},
        target_popularity=np.r_[np.zeros(cold, np.int64), np.full(n - cold, 7)],
        target_long_tail=np.zeros(n, np.int64))
    models = tmp_path / "models" / "synth"
    promoted, candidate = models / "20210101T000000Z-learn_hybrid-aaa111", models / "20210102T000000Z-learn_hybrid-bbb222"
    for d in (promoted, candidate):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"kind": "learn_hybrid"}))
    ranks = {str(promoted): np.zeros(n, np.int64), str(candidate): np.r_[np.full(cold, 500), np.zeros(n - cold, np.int64)]}

    def fake_score(cfg, dataset, protocol, kind, run_dir, sample):
        r = ranks[str(run_dir)]
        return {"recall@200": float((r < 200).mean()), "ranks": r.tolist(), "cached": True}

    monkeypatch.setattr(gate.registry, "promoted", lambda cfg, dataset: promoted)
    promotions: list[Path] = []
    monkeypatch.setattr(gate.registry, "promote", lambda cfg, dataset, run, reason: promotions.append(run))
    monkeypatch.setattr(gate.gate_sample, "load_sample", lambda cfg, dataset: sample)
    monkeypatch.setattr(gate.gate_sample, "score", fake_score)
    evaluated = {"valid": {"recall@200": 0.985, "sample": "s1"}}
    for slices, promote in ((["cold_start", "long_tail"], False), ([], True)):
        cfg = settings.with_overrides(home=str(tmp_path / str(len(slices))),
                                      pipeline={"gate_slices": slices, "gate_min_cases": 10, "gate_n_boot": 200})
        a = runs.RunArgs.from_params(cfg, {"dataset": "synth"}, None, "2021-01-02")
        res = gate.promotion_gate(cfg, a, {"run_dir": str(candidate)}, evaluated)
        assert res["promoted"] is promote
        if slices:
            cold_row = res["slices"]["cold_start"]
            assert cold_row["cases"] == cold and cold_row["status"] == "failed"
            assert cold_row["difference"]["hi"] == pytest.approx(-1.0)
            assert res["slices"]["long_tail"]["status"] == "skipped"  # no long-tail case in this sample
            assert "worse on cold_start recall@200 0.0000 vs 1.0000" in res["reason"] and not promotions
            from learn_tasks.orchestration.summary import render_summary
            md = render_summary({"promotion": res, "run": {"dataset": "synth", "mode": "incremental", "start": a.start,
                                                           "end": a.end}, "reports": {}})
            assert "| cold_start | 15 | 0.0000 | 1.0000 | 0.9800 | -1.0000 [-1.0000, -1.0000] | failed |" in md
            assert "| long_tail | 0 | - | - | - | - | skipped |" in md
        else:
            assert res["slices"] == {} and promotions == [candidate]


# ------------------------------------------------------------------------------ gate sample and cache
def test_gate_reuses_the_promoted_models_score_only_while_its_inputs_are_unchanged(
        settings: Settings, synth_dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promoted model was scored on the fixed sample as the candidate of the run that promoted it;
    the next run's gate reuses that score. A new sample (or another model) is scored afresh, and a
    score is the same whether computed or reused."""
    from learn_tasks.evaluation import gate_sample
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    cfg = settings.with_overrides(
        model={"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 10},
        train={"batch_size": 64, "n_random_negatives": 16, "val_users": 50, "threads": 1},
        pipeline={"model": "sasrec", "protocol": "loo", "gate_users": 80, "incremental_eval_users": 50})
    day = pd.Timestamp("2021-01-01", tz="UTC")
    full = runs.RunArgs(synth_dataset, "full", day, day + pd.Timedelta(days=1))
    inc = runs.RunArgs(synth_dataset, "incremental", day + pd.Timedelta(days=1), day + pd.Timedelta(days=2))
    run_a = train.train_model(cfg, synth_dataset, model="sasrec", epochs=1)["run_dir"]
    from learn_tasks.data.splits import load_split
    from learn_tasks.evaluation import harness
    from learn_tasks.pch.model import PCH

    item_passes = []
    encode_items = PCH.encode_items
    monkeypatch.setattr(PCH, "encode_items", lambda self, *a, **k: item_passes.append(1) or encode_items(self, *a, **k))
    ev_a = stages.evaluate_candidate(cfg, full, {"run_dir": run_a})
    # the test report and the gate sample share one scorer: one pass over the (small) catalogue, same figures
    assert len(item_passes) == 1
    alone = harness.evaluate_run(stages.eval_settings(cfg, cfg.pipeline.eval_users), synth_dataset, "loo",
                                 model="sasrec", run_dir=run_a, write_report=False)
    assert ev_a["test"]["table"] == stages._table(alone, cfg.evaluate.ks)
    sample = gate_sample.load_sample(cfg, synth_dataset)
    assert ev_a["valid"]["users"] == len(sample) == 80 and ev_a["valid"]["sample"] == sample.digest
    scorer = harness.make_scorer(cfg, synth_dataset, "loo", "sasrec", load_split(cfg, synth_dataset, "loo"), run_a)
    with pytest.raises(ValueError, match="not for the run"):  # its score would be cached under another run's key
        gate_sample.score(cfg, synth_dataset, "loo", "sasrec", Path(run_a).parent / "other", sample, scorer=scorer)
    first = gate.promotion_gate(cfg, full, {"run_dir": run_a}, ev_a)
    assert first["promoted"] and first["previous"] is None

    run_b = train.train_model(cfg, synth_dataset, model="sasrec", epochs=1, warm_start=run_a)["run_dir"]
    ev_b = stages.evaluate_candidate(cfg, inc, {"run_dir": run_b})
    assert ev_b["valid"]["sample"] == sample.digest  # an incremental run keeps the sample
    second = gate.promotion_gate(cfg, inc, {"run_dir": run_b}, ev_b)
    assert second["previous"] == str(run_a)
    assert second["previous_score_cached"] is True
    assert second["previous_score"] == ev_a["valid"][cfg.pipeline.gate_metric]
    fresh = gate_sample.score(cfg, synth_dataset, "loo", "sasrec", run_a, sample, use_cache=False)
    assert fresh["cached"] is False and fresh[cfg.pipeline.gate_metric] == second["previous_score"]

    # Another sample size is another sample: nothing cached applies to it.
    other = cfg.with_overrides(pipeline={"gate_users": 60})
    inc2 = runs.RunArgs(synth_dataset, "incremental", day + pd.Timedelta(days=2), day + pd.Timedelta(days=3))
    registry.promote(other, synth_dataset, run_a, reason="test")
    ev_c = stages.evaluate_candidate(other, inc2, {"run_dir": run_b})
    assert ev_c["valid"]["sample"] != sample.digest and ev_c["valid"]["users"] == 60
    third = gate.promotion_gate(other, inc2, {"run_dir": run_b}, ev_c)
    assert third["previous"] == str(run_a) and third["previous_score_cached"] is False


def test_incremental_fine_tune_trains_the_days_users_and_a_replay_sample(settings: Settings,
                                                                         synth_dataset: str) -> None:
    import numpy as np

    from learn_tasks.data import datasets as data

    inter = data.load_interactions(settings, synth_dataset)
    end = inter[S.EVENT_TIMESTAMP].max().floor("D") + pd.Timedelta(days=1)
    a = runs.RunArgs(synth_dataset, "incremental", end - pd.Timedelta(days=1), end, window_days=3)
    day_users = set(inter.loc[inter[S.EVENT_TIMESTAMP] >= a.accept_from, S.USER_ID].astype(int))
    assert day_users
    cfg = settings.with_overrides(pipeline={"incremental_replay_users": 20})
    users = stages.fine_tune_users(cfg, a)
    assert day_users <= set(users.tolist()) and len(users) == len(day_users) + 20
    np.testing.assert_array_equal(users, stages.fine_tune_users(cfg, a))  # a re-run trains the same users
    assert stages.fine_tune_users(settings.with_overrides(pipeline={"incremental_replay_users": None}), a) is None
    assert stages.fine_tune_users(settings.with_overrides(pipeline={"incremental_replay_users": 10**6}), a) is None
    # a sparse update trains on the window's users alone, whatever the replay setting
    assert set(stages.fine_tune_users(settings, a, window_only=True).tolist()) == day_users


# ------------------------------------------------------------------------------ retrain across kinds
def test_incremental_retrain_warm_starts_only_from_a_promoted_model_of_the_same_kind(
        settings: Settings, synth_dataset: str) -> None:
    import numpy as np

    from learn_tasks.data import datasets as data
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    small = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 10},
             "train": {"batch_size": 64, "n_random_negatives": 16, "val_users": 50, "threads": 1}}
    items = data.load_items(settings, synth_dataset)[S.ITEM_ID].to_numpy(np.int64)
    emb = np.random.default_rng(0).normal(size=(len(items), 8)).astype(np.float32)
    cfg = settings.with_overrides(**small)
    content_run = train.train_model(cfg, synth_dataset, model="learn", epochs=1, embeddings=(items, emb))["run_dir"]
    registry.promote(cfg, synth_dataset, content_run, reason="test")
    assert registry.run_kind(Path(content_run)) == "learn"

    # the serving model is a content-only `learn`; the candidate kind is now sasrec: no warm start
    cfg = settings.with_overrides(**small, pipeline={"model": "sasrec", "protocol": "loo"})
    day = pd.Timestamp("2021-01-01", tz="UTC")
    a = runs.RunArgs(synth_dataset, "incremental", day, day + pd.Timedelta(days=1), epochs=1, budget_s=30)
    first = stages.train_pch(cfg, a)
    assert first["kind"] == "sasrec" and first["warm_start"] is None

    # once a sasrec serves, the next increment warm-starts from it
    registry.promote(cfg, synth_dataset, first["run_dir"], reason="test")
    b = runs.RunArgs(synth_dataset, "incremental", day + pd.Timedelta(days=1), day + pd.Timedelta(days=2), epochs=1,
                  budget_s=30)
    second = stages.train_pch(cfg, b)
    assert second["kind"] == "sasrec" and second["warm_start"] == first["run_dir"]
    assert second["run_dir"] != first["run_dir"]


def test_challengers_train_every_kind_and_the_best_on_validation_is_the_candidate(
        settings: Settings, synth_dataset: str) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.pch import registry
    from learn_tasks.storage import write_json

    items = data.load_items(settings, synth_dataset)[S.ITEM_ID].to_numpy(np.int64)
    fp = "enc-test"  # a complete embedding version of random content vectors
    vdir = store.store_dir(settings, synth_dataset, fp)
    store.write_part(vdir, items, [f"h{i}" for i in items],
                     np.random.default_rng(0).normal(size=(len(items), 8)).astype(np.float32), "s0of1")
    write_json({"dim": 8, "dataset": synth_dataset}, vdir / "manifest.json")
    store.set_current_fingerprint(settings, synth_dataset, fp)
    small = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 10},
             "train": {"batch_size": 64, "n_random_negatives": 16, "val_users": 50, "threads": 1, "patience": 5}}
    cfg = settings.with_overrides(**small, pipeline={"model": "learn", "challengers": ["sasrec", "learn"],
                                                     "protocol": "loo"})
    day = pd.Timestamp("2021-01-01", tz="UTC")
    full = runs.RunArgs(synth_dataset, "full", day, day + pd.Timedelta(days=1), epochs=2, budget_s=60)
    assert stages.candidate_kinds(cfg, full) == ["learn", "sasrec"]  # pipeline.model first, no kind twice
    assert stages.candidate_kinds(cfg, runs.RunArgs(synth_dataset, "full", day, day + pd.Timedelta(days=1),
                                                    model="sasrec")) == ["sasrec"]  # a run naming its kind
    trained = stages.train_pch(cfg, full)
    choice = trained["choice"]
    metric = cfg.train.early_stop_metric
    assert [c["kind"] for c in choice["kinds"]] == ["learn", "sasrec"] and choice["metric"] == metric
    best = max(choice["kinds"], key=lambda c: c["val"])
    assert trained["kind"] == choice["chosen"] == best["kind"] and trained["run_dir"] == best["run_dir"]
    assert trained["val"][metric] == best["val"]
    assert all(Path(c["run_dir"]).exists() for c in choice["kinds"]) and len({c["run_dir"] for c in choice["kinds"]}) == 2
    assert stages.train_pch(cfg, full)["reused"]  # same inputs: nothing trained again
    # a retry after a change of the choice's inputs reuses each kind's own record
    (runs.run_dir(cfg, full) / "train.json").unlink()
    again = stages.train_pch(cfg, full)
    assert [c["reused"] for c in again["choice"]["kinds"]] == [True, True] and again["run_dir"] == trained["run_dir"]

    # an increment updates the promoted model's kind when it is allowed: here the challenger's
    sasrec = next(c for c in choice["kinds"] if c["kind"] == "sasrec")
    registry.promote(cfg, synth_dataset, sasrec["run_dir"], reason="test")
    inc = runs.RunArgs(synth_dataset, "incremental", day + pd.Timedelta(days=1), day + pd.Timedelta(days=2),
                       epochs=1, budget_s=30)
    assert stages.candidate_kinds(cfg, inc) == ["sasrec"]
    update = stages.train_pch(cfg, inc)
    assert update["kind"] == "sasrec" and update["warm_start"] == sasrec["run_dir"] and "choice" not in update
    # without challengers the promoted sasrec is not allowed: the increment trains pipeline.model (`learn`)
    assert stages.candidate_kinds(cfg.with_overrides(pipeline={"challengers": []}), inc) == ["learn"]
    # kinds validated on different terms cannot be chosen between
    uneven = cfg.with_overrides(train={"per_model": {"sasrec": {"train": {"val_users": 10}}}})
    with pytest.raises(runs.PipelineError, match="validate alike"):
        stages.candidate_kinds(uneven, full)


# ------------------------------------------------------------------- land, validate, publish (no Airflow)
def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_incremental_batch_lands_validates_publishes_once(settings: Settings, synth_dataset: str) -> None:
    from learn_tasks.data import datasets as data

    cfg = settings.with_overrides(validate={"max_failed_share": 0.5, "data_docs": False})
    inter = data.load_interactions(cfg, synth_dataset)
    items = data.load_items(cfg, synth_dataset)
    day = (inter[S.EVENT_TIMESTAMP].max() + pd.Timedelta(days=1)).floor("D")
    users, known = inter[S.USER_ID].unique()[:4], items[S.ITEM_ID].to_numpy()[:4]
    new_id = int(items[S.ITEM_ID].max()) + 1
    t = int((day + pd.Timedelta(hours=6)).timestamp())
    rows = [(users[0], known[0], t), (users[1], known[1], t + 1), (users[2], new_id, t + 2),  # good (new item)
            (users[3], new_id + 1, t + 3),  # its item has an empty title -> quarantined as unknown item
            (users[0], known[0], t),  # duplicate of the first row
            (users[1], known[2], t - 3 * 86400)]  # outside the run's window
    incoming = cfg.paths.incoming(synth_dataset)
    (incoming / "interactions").mkdir(parents=True)
    (incoming / "items").mkdir(parents=True)
    pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]).to_csv(
        incoming / "interactions" / "day.csv", index=False)
    pd.DataFrame({S.ITEM_ID: [new_id, new_id + 1], S.TITLE: ["Baking Bread at Home", " "]}).to_csv(
        incoming / "items" / "new.csv", index=False)

    a = runs.RunArgs(synth_dataset, runs.INCREMENTAL, day, day + pd.Timedelta(days=1))
    landed = landing.land_logs(cfg, a)
    assert sorted(landed["new_files"]) == ["raw/interactions/interactions__day.csv", "raw/items/items__new.csv"]
    assert landed["rows"] == {"interactions": 6, "items": 2}
    assert not list(incoming.rglob("*.csv"))  # claimed: each file belongs to one interval only

    summary = landing.validate_logs(cfg, a)
    vi, vt = summary["interactions"], summary["items"]
    assert vi["read"] == 6 == vi["accepted"] + vi["quarantined"]
    assert vi["by_check"] == {"known_item": 1, "duplicate_event": 1, "timestamp_in_interval": 1}
    assert vt == {**vt, "read": 2, "accepted": 1, "quarantined": 1, "by_check": {"title_present": 1}}
    pub = summary["published"]
    assert pub["changed"] and pub["interactions_added"] == 3 and pub["items_added"] == 1
    after = data.load_interactions(cfg, synth_dataset)
    assert len(after) == len(inter) + 3
    assert new_id in set(after[S.ITEM_ID]) and new_id in set(data.load_items(cfg, synth_dataset)[S.ITEM_ID])
    base = data.dataset_dir(cfg, synth_dataset)
    state = _digest(base / "interactions.parquet", base / "items.parquet")
    qdir = cfg.paths.quarantine() / synth_dataset / a.key
    quarantine = _digest(qdir / "interactions.parquet", qdir / "items.parquet")

    # the same interval again: same batch, same verdicts, nothing published twice
    assert landing.land_logs(cfg, a)["rows"] == landed["rows"]
    again = landing.validate_logs(cfg, a)
    assert again["published"]["changed"] is False and again["published"]["already_present"] == 3
    assert _digest(base / "interactions.parquet", base / "items.parquet") == state
    assert _digest(qdir / "interactions.parquet", qdir / "items.parquet") == quarantine

    # the next day has no new files: nothing to validate, nothing changes
    b = runs.RunArgs(synth_dataset, runs.INCREMENTAL, a.end, a.end + pd.Timedelta(days=1))
    assert landing.land_logs(cfg, b)["rows"] == {"interactions": 0, "items": 0}
    assert landing.validate_logs(cfg, b)["published"]["changed"] is False
    assert _digest(base / "interactions.parquet", base / "items.parquet") == state


def test_failure_callback_writes_a_clear_note(settings: Settings) -> None:
    ti = SimpleNamespace(dag_id="learn_pipeline", task_id="train_pch", map_index=-1, try_number=2, max_tries=1)
    context = {"ti": ti, "exception": ValueError("no training user with 2 or more events"),
               "params": {"dataset": "synth", "mode": "full"},
               "data_interval_start": pd.Timestamp("2021-01-01", tz="UTC"),
               "data_interval_end": pd.Timestamp("2021-01-02", tz="UTC")}
    tasks.on_task_failure(context)
    a = runs.RunArgs.from_params(settings, context["params"], "2021-01-01", "2021-01-02")
    note = json.loads((runs.run_dir(settings, a) / "failures" / "learn_pipeline.train_pch.json").read_text())
    assert note["final"] is True
    for part in ("learn_pipeline.train_pch FAILED", "try 2 of 2", "dataset synth (full)",
                 "[2021-01-01T00:00:00+00:00, 2021-01-02T00:00:00+00:00)",
                 "ValueError: no training user with 2 or more events"):
        assert part in note["message"]


# ---------------------------------------------------------------- end to end through Airflow's runner
def _milvus_state(cfg: Settings, dataset: str) -> tuple[str | None, int]:
    from learn_tasks.online import index

    client = index.connect(cfg)
    try:
        name = index.current(cfg, dataset, client)
        if name is None:
            return None, 0
        index.ensure_loaded(client, name)
        rows = client.query(name, filter=f"{S.ITEM_ID} >= 0", output_fields=["count(*)"])
        return name, int(rows[0]["count(*)"])
    finally:
        index.close(cfg)


def _milvus_has(cfg: Settings, dataset: str, ids: list[int]) -> set[int]:
    from learn_tasks.online import index

    client = index.connect(cfg)
    try:
        name = index.current(cfg, dataset, client)
        index.ensure_loaded(client, name)
        got = client.get(name, ids=ids, output_fields=[S.ITEM_ID])
        return {int(r[S.ITEM_ID]) for r in got}
    finally:
        index.close(cfg)


def _release_events(dataset: str) -> list[dict]:
    """The extras of the `learn_release` asset events of ``dataset`` in the Airflow metadata DB."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    from learn_tasks.orchestration import assets

    with create_session() as session:
        rows = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.name == assets.RELEASE_ASSET[0]).all())
        return [dict(e.extra or {}) for e in rows if (e.extra or {}).get("dataset") == dataset]


def _feast_user(cfg: Settings, dataset: str, user_id: int) -> dict:
    from learn_tasks.online import features

    fs = features.get_store(cfg, dataset)
    return features.online_user_features(fs, [user_id], service=cfg.features.feature_service)[user_id]


def _store_state(cfg: Settings, dataset: str) -> dict[str, str]:
    """Embedding store parts + CURRENT, Feast state, model folders and promotions: what must not move."""
    from learn_tasks.online import features

    emb = cfg.paths.embeddings() / dataset
    out = {str(p.relative_to(emb)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(emb.rglob("*")) if p.is_file() and (p.name.startswith("part-") or p.name == "CURRENT")}
    state = json.loads((features.store_dir(cfg, dataset) / "state.json").read_text())
    out["feast_state"] = json.dumps({k: state.get(k) for k in ("tables", "applied", "materialized")}, sort_keys=True)
    models = cfg.paths.models() / dataset
    out["models"] = ",".join(sorted(p.name for p in models.iterdir()))
    out["promotions"] = (models / "promotions.jsonl").read_text()
    return out


@pytest.mark.integration
def test_learn_pipeline_end_to_end_and_idempotent(settings: Settings, synth_dataset: str, airflow_home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.pch import registry

    cfg = settings
    items = data.load_items(cfg, synth_dataset)
    inter = data.load_interactions(cfg, synth_dataset)
    events_before = _release_events(synth_dataset)
    res = runner.run_pipeline(cfg, dataset=synth_dataset, mode="full", day="2021-01-01", epochs=2, budget_s=60,
                         airflow_home=airflow_home)
    assert res["ok"], (res.get("failures"), res["tasks"])
    names = {t["task"] for t in res["tasks"]}
    assert {"land_logs", "validate_logs", "refresh_user_features", "plan_encode_shards", "encode_new_items[0]",
            "train_pch", "evaluate", "promotion_gate", "load_milvus", "monitor", "summarize"} <= names

    # validation: every row accounted for, report and Data Docs written
    v = res["validation"]
    assert v["interactions"]["read"] == v["interactions"]["accepted"] == len(inter)
    assert v["items"]["read"] == len(items)
    assert Path(res["reports"]["data_docs"]).exists()
    # encoding: every item has an embedding in the current version
    assert res["encoding"]["encoded"] + res["encoding"]["skipped"] + res["encoding"]["quarantined"] == len(items)
    assert store.current_fingerprint(cfg, synth_dataset) == res["encoding"]["fingerprint"]
    # training, evaluation, promotion agree on one run folder
    run_dir = Path(res["training"]["run_dir"])
    assert (run_dir / "model.safetensors").exists()
    assert res["evaluation"]["run_dir"] == str(run_dir)
    assert (Path(res["reports"]["evaluation"]) / "metrics.json").exists()
    assert {"all", "head"} <= set(res["evaluation"]["test"]["table"])
    assert res["promotion"]["promoted"] is True and registry.promoted(cfg, synth_dataset) == run_dir
    # Milvus: the serving model's collection behind the alias holds every catalogue item
    collection, count = _milvus_state(cfg, synth_dataset)
    assert collection == res["milvus"]["collection"] and count == len(items)
    # the release the service follows: written by load_milvus once the collection was checked, and
    # announced as the learn_release asset event (through load_milvus' alias outlet)
    from learn_tasks.online import releases

    rel = releases.current(cfg, synth_dataset)
    assert (rel["model_version"], rel["collection"]) == (run_dir.name, collection)
    assert rel["source"].startswith("learn_pipeline ") and res["milvus"]["released"] is True
    assert res["milvus"]["release_id"] == rel["release_id"]
    announced = _release_events(synth_dataset)
    assert len(announced) == len(events_before) + 1 and announced[-1]["release_id"] == rel["release_id"]
    # Feast: online features of a known user are their latest items
    user = int(inter[S.USER_ID].iloc[0])
    feats = _feast_user(cfg, synth_dataset, user)
    last = inter[inter[S.USER_ID] == user].sort_values(S.EVENT_TIMESTAMP)[S.ITEM_ID].tolist()
    assert feats[S.RECENT_ITEM_IDS] and list(feats[S.RECENT_ITEM_IDS])[-1] == last[-1]
    assert Path(res["reports"]["monitoring"]).exists()
    assert Path(res["reports"]["summary"]).read_text().startswith("# learn_pipeline")

    # the same interval again: every task succeeds and no store moves
    before = _store_state(cfg, synth_dataset)
    again = runner.run_pipeline(cfg, dataset=synth_dataset, mode="full", day="2021-01-01", epochs=2, budget_s=60,
                           airflow_home=airflow_home)
    assert again["ok"], (again.get("failures"), again["tasks"])
    assert again["training"]["reused"] is True and again["training"]["run_dir"] == str(run_dir)
    assert _store_state(cfg, synth_dataset) == before
    assert _milvus_state(cfg, synth_dataset) == (collection, count)
    assert _feast_user(cfg, synth_dataset, user) == feats
    assert releases.current(cfg, synth_dataset) == rel  # released once: the re-run writes no second record

    # item_ingest: new items are validated, encoded and searchable without a retrain
    incoming = cfg.paths.incoming(synth_dataset)
    incoming.mkdir(parents=True, exist_ok=True)
    new_ids = [int(items[S.ITEM_ID].max()) + k for k in (1, 2)]
    pd.DataFrame({S.ITEM_ID: new_ids, S.TITLE: ["Rockets and Orbits", "Sourdough for Beginners"]}).to_csv(
        incoming / "items-new.csv", index=False)
    dr, tasks, _ = runner.run_dag(cfg, runs.ITEM_DAG, {"dataset": synth_dataset},
                             pd.Timestamp("2021-01-02 06:00", tz="UTC").to_pydatetime(), airflow_home=airflow_home)
    assert all(t["state"] == "success" for t in tasks), tasks
    assert _milvus_has(cfg, synth_dataset, new_ids) == set(new_ids)
    assert _milvus_state(cfg, synth_dataset) == (collection, count + 2)  # same collection: no retrain, no reload
    assert (cfg.paths.models() / synth_dataset).joinpath("PROMOTED").read_text().strip() == run_dir.name

    # an incremental day: new events and a new item; the gate (made strict here) keeps the current model,
    # whose live collection then gains the new item by upsert instead of being rebuilt
    monkeypatch.setenv("LEARN_PIPELINE__PROMOTION_MARGIN", "-1.0")  # floor = 2 x current: never promote
    day = pd.Timestamp("2021-01-02 10:00", tz="UTC")
    fresh = int(items[S.ITEM_ID].max()) + 3
    users = inter[S.USER_ID].unique()[:5]
    events = pd.DataFrame({S.USER_ID: users, S.ITEM_ID: [*items[S.ITEM_ID].iloc[:4], fresh],
                           S.EVENT_TIMESTAMP: [day + pd.Timedelta(minutes=i) for i in range(5)]})
    events.to_parquet(incoming / "interactions-day.parquet")
    pd.DataFrame({S.ITEM_ID: [fresh], S.TITLE: ["Telescopes for Stargazers"]}).to_csv(
        incoming / "items-day.csv", index=False)
    inc = runner.run_pipeline(cfg, dataset=synth_dataset, mode="incremental", day="2021-01-02", epochs=1, budget_s=30,
                         airflow_home=airflow_home)
    assert inc["ok"], (inc.get("failures"), inc["tasks"])
    assert inc["validation"]["interactions"] == {**inc["validation"]["interactions"], "read": 5, "accepted": 5}
    assert inc["validation"]["published"]["interactions_added"] == 5
    assert inc["training"]["warm_start"] == str(run_dir) and inc["training"]["reused"] is False
    assert inc["promotion"]["promoted"] is False and "keeping the current model" in inc["promotion"]["reason"]
    assert registry.promoted(cfg, synth_dataset) == run_dir
    assert inc["milvus"]["refreshed"]["new"] == 1 and inc["milvus"]["refreshed"]["changed"] == 0
    # the kept model was already released: no new release, no asset event for learn_monitoring
    assert inc["milvus"]["released"] is False and releases.current(cfg, synth_dataset) == rel
    assert len(_release_events(synth_dataset)) == len(announced) + 1  # + 1: the re-run of day 1 announced it again
    assert _milvus_state(cfg, synth_dataset) == (collection, count + 3)
    assert _milvus_has(cfg, synth_dataset, [fresh]) == {fresh}

    # the next day the gate promotes: a sparse update (only ID rows of items with new evidence train), whose
    # few changed rows are rewritten in the live collection, which is then released as the new version
    monkeypatch.setenv("LEARN_PIPELINE__PROMOTION_MARGIN", "1.0")  # floor = 0: always promote
    day3 = pd.Timestamp("2021-01-03 10:00", tz="UTC")
    pd.DataFrame({S.USER_ID: users[:3], S.ITEM_ID: items[S.ITEM_ID].iloc[5:8].to_numpy(),
                  S.EVENT_TIMESTAMP: [day3 + pd.Timedelta(minutes=i) for i in range(3)]}).to_parquet(
        incoming / "interactions-day3.parquet")
    inc3 = runner.run_pipeline(cfg, dataset=synth_dataset, mode="incremental", day="2021-01-03", epochs=1,
                               budget_s=30, airflow_home=airflow_home)
    assert inc3["ok"], (inc3.get("failures"), inc3["tasks"])
    assert inc3["training"]["update"] == "sparse" and inc3["training"]["sparse_rows"] > 0
    assert inc3["promotion"]["promoted"] is True
    new_run = registry.promoted(cfg, synth_dataset)
    assert new_run != run_dir and inc3["training"]["run_dir"] == str(new_run)
    m = inc3["milvus"]
    assert m["collection"] == collection and m["updated_from"] == run_dir.name and m["released"] is True
    assert 0 < m["upserted"] < count // 2  # the changed rows, not the catalogue
    rel3 = releases.current(cfg, synth_dataset)
    assert (rel3["model_version"], rel3["collection"]) == (new_run.name, collection)
    assert _milvus_state(cfg, synth_dataset) == (collection, count + 3)
    from learn_tasks.online import index
    from learn_tasks.online.bundle import ModelBundle

    client = index.connect(cfg)
    try:
        assert index.collection_version(client, collection) == new_run.name
        stored = index.fetch_all(client, collection, vectors_only=True)
    finally:
        index.close(cfg)
    bundle = ModelBundle.load(cfg, synth_dataset, new_run)
    known = np.array([i for i in stored.item_ids if bundle.knows(int(i))], np.int64)
    pos = np.searchsorted(stored.item_ids, known)
    assert np.abs(stored.vectors[pos] - bundle.item_vectors(known)).max() < 1e-4  # every row is the new model's
