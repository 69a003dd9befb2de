"""Hyper-parameter search (learn_tasks/training/tuning.py) and model comparison (learn_tasks/evaluation/compare.py)."""
from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from learn_tasks import schema as S
from learn_tasks.evaluation import compare
from learn_tasks.pch import kinds
from learn_tasks.training import tuning
from tests.test_train import small, topic_embeddings


# ------------------------------------------------------------------------------------------ spaces
def test_logq_is_searched_only_where_negatives_follow_popularity():
    assert tuning.canonical({"train.loss": "bce", "train.logq": True})["train.logq"] is False
    assert tuning.canonical({"train.loss": "full_softmax", "train.logq": True})["train.logq"] is False
    assert tuning.canonical({"train.loss": "next_item", "train.logq": True})["train.logq"] is True
    configs = tuning.space_configs("sasrec")
    # dropout x width x blocks x lr x (bce, next_item +/- logQ, full_softmax) x weight decay
    assert len(configs) == 2 * 2 * 2 * 2 * 4 * 2
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    assert not any(c["train.logq"] and c["train.loss"] not in tuning.LOGQ_LOSSES for c in configs)
    assert {c["train.loss"] for c in configs} == {"bce", "next_item", "full_softmax"}
    assert len(tuning.space_configs("learn_hybrid")) == 3 * len(tuning.space_configs("learn"))
    with pytest.raises(ValueError, match="no search space"):
        tuning.space_configs("popular")


def test_every_kinds_current_settings_are_in_its_space(settings):
    for kind in tuning.SPACES:
        assert tuning.current_params(settings, kind) in tuning.space_configs(kind), kind


def test_sampled_configurations_start_with_the_current_settings(settings):
    a = tuning.sample_configs(settings, "sasrec", 9, seed=3)
    assert a == tuning.sample_configs(settings, "sasrec", 9, seed=3)  # seeded
    assert a != tuning.sample_configs(settings, "sasrec", 9, seed=4)
    assert a[0] == tuning.current_params(settings, "sasrec") and len(a) == 9
    assert len({json.dumps(c, sort_keys=True) for c in a}) == 9
    everything = tuning.sample_configs(settings, "learn", 10_000)
    assert len(everything) == len(tuning.space_configs("learn"))
    with pytest.raises(ValueError):
        tuning.sample_configs(settings, "learn", 0)


def test_searched_settings_become_per_model_overrides(settings):
    cfg = tuning.with_params(settings, "sasrec", {"model.d_model": 64, "train.lr": 5e-4, "train.loss": "full_softmax"})
    c = kinds.resolve(cfg, "sasrec")
    assert (c.model.d_model, c.model.out_dim, c.train.lr, c.train.loss) == (64, 64, 5e-4, "full_softmax")
    assert kinds.resolve(cfg, "learn").train.lr == kinds.resolve(settings, "learn").train.lr  # other kinds untouched
    with pytest.raises(ValueError, match="only model"):
        tuning.section_overrides("learn", {"evaluate.ks": [10]})


# ------------------------------------------------------------------------------------------ halving
def test_plan_rungs_and_budget():
    assert tuning.Plan(27, 1, 3).rungs() == [(27, 1), (9, 3), (3, 9)]
    assert tuning.Plan(27, 1, 3).budget_epochs == 81 and tuning.Plan(27, 1, 3).max_epochs == 9
    assert tuning.Plan(4, 2, 2).rungs() == [(4, 2), (2, 4)] and tuning.Plan(4, 2, 2).budget_epochs == 16
    assert tuning.Plan(1, 5).rungs() == [] and tuning.Plan(1, 5).budget_epochs == 0
    with pytest.raises(ValueError):
        tuning.Plan(4, 0)
    with pytest.raises(ValueError):
        tuning.Plan(4, 1, eta=1)


def test_successive_halving_keeps_the_best_and_spends_the_plan():
    cands = [{"x": i} for i in range(9)]
    quality = {0: 0.5, 1: 0.1, 2: 0.9, 3: float("nan"), 4: 0.7, 5: 0.2, 6: 0.9, 7: 0.3, 8: 0.6}
    calls = []

    def run(pairs):
        calls.append(pairs)
        # a score that grows with epochs, so later rungs score higher, and candidate 6 learns slower than 2
        return [{"score": quality[p["x"]] * (1 - 0.5 / e) + (0.01 * (e - 1) if p["x"] == 6 else 0.0), "epochs_run": e}
                for p, e in pairs]

    out = tuning.successive_halving(cands, tuning.Plan(9, 1, 3), run)
    assert [len(c) for c in calls] == [9, 3] and {e for _, e in calls[1]} == {3}
    assert [p["x"] for p, _ in calls[1]] == [2, 6, 4]  # best first, a tie keeps the earlier candidate first
    assert out["chosen"] == {"x": 6} and out["epochs_trained"] == 9 * 1 + 3 * 3 == out["plan"]["budget_epochs"]
    assert len(out["trials"]) == 12 and out["trials"][0]["rung"] == 0
    with pytest.raises(ValueError, match="for 9 candidates"):
        tuning.successive_halving(cands[:3], tuning.Plan(9, 1, 3), run)
    single = tuning.successive_halving(cands[:1], tuning.Plan(1, 1, 3), run)
    assert single["chosen"] == {"x": 0} and single["trials"] == []


def test_choose_value_with_a_floor_and_its_fallback():
    scores = {1: {"all": 0.3, "cold": 0.1}, 2: {"all": 0.5, "cold": 0.05}, 3: {"all": 0.2, "cold": 0.3}}
    got = tuning.choose_value([1, 2, 3], scores.get, "all", admissible=lambda r: r["cold"] >= 0.1,
                              fallback_key="cold")
    assert got["chosen"] == 1 and got["constraint_met"] and [r["admissible"] for r in got["table"]] == [True, False, True]
    none = tuning.choose_value([1, 2, 3], scores.get, "all", admissible=lambda r: r["cold"] > 1, fallback_key="cold")
    assert none["chosen"] == 3 and not none["constraint_met"]
    assert tuning.choose_value([1, 2, 3], scores.get, "all")["chosen"] == 2
    nan = tuning.choose_value([1, 2], {1: {"all": float("nan")}, 2: {"all": 0.0}}.get, "all")
    assert nan["chosen"] == 2


# ------------------------------------------------------------------------------------------ real runs
def read_log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def test_a_rung_is_the_beginning_of_the_longer_run(settings, synth_dataset):
    """Search trials share the final runs' step schedule, so a 1-epoch trial is the first epoch of the
    3-epoch run of the same configuration: same steps, learning rates and losses."""
    cfg = small(settings, warmup_steps=1)
    params = {**tuning.sample_configs(cfg, "sasrec", 1)[0], "train.batch_size": 32, "train.lr_schedule": "cosine"}
    short = tuning.run_job(tuning.TrainJob(cfg, synth_dataset, "loo", "sasrec",
                                           {**params, **tuning.trial_controls(1, 3, 0, 0)}, 1))
    longer = tuning.run_job(tuning.TrainJob(cfg, synth_dataset, "loo", "sasrec",
                                            {**params, **tuning.trial_controls(3, 3, 0, 0)}, 3))
    a, b = read_log(short["run_dir"]), read_log(longer["run_dir"])
    assert len(a) == 1 and len(b) == 3
    assert (a[0]["step"], a[0]["lr"]) == (b[0]["step"], b[0]["lr"]) and a[0]["loss"] == pytest.approx(b[0]["loss"])
    assert "val_recall@200" in a[0] and "val_recall@200" not in b[0]  # one validation round, after the last epoch
    assert short["val_last"]["recall@200"] == short["val"]["recall@200"]
    with pytest.raises(ValueError, match="does not fit"):
        tuning.trial_controls(4, 3, 0, 0)


def test_a_small_search_then_final_and_refit_runs(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    cfg = small(settings)
    plan = tuning.Plan(4, 1, 2)
    cands = tuning.sample_configs(cfg, "learn_hybrid", plan.configs, seed=1)
    overrides = {"model.d_model": 32, "model.n_layers": 1}  # keep the tiny test model tiny

    def run(pairs):
        jobs = [tuning.TrainJob(cfg, synth_dataset, "temporal", "learn_hybrid",
                                {**p, **overrides, **tuning.trial_controls(e, 4, 0, 0)}, e, keep=False, embeddings=emb)
                for p, e in pairs]
        return [{"score": r["val_last"].get("recall@200"), "epochs_run": r["epochs_run"], "run_dir": r["run_dir"]}
                for r in map(tuning.run_job, jobs)]

    out = tuning.successive_halving(cands, plan, run)
    assert out["chosen"] in cands and [t["epochs"] for t in out["trials"]] == [1, 1, 1, 1, 2, 2]
    assert all(t["run_dir"] is None for t in out["trials"])  # trial folders are removed
    assert all(math.isfinite(t["score"]) for t in out["trials"])
    params = {**out["chosen"], **overrides}
    final = tuning.run_job(tuning.TrainJob(cfg, synth_dataset, "temporal", "learn_hybrid",
                                           {**params, **tuning.final_controls(4, 1, 0, 10)}, 4, embeddings=emb))
    assert final["epochs_run"] == 4 and final["val"] is not None and 1 <= final["best_epoch"] <= 4
    assert len([x for x in read_log(final["run_dir"]) if "val_recall@200" in x]) == 4  # validated every epoch
    refit = tuning.run_job(tuning.TrainJob(cfg, synth_dataset, "temporal", "learn_hybrid",
                                           {**params, **tuning.refit_controls(4, 1)}, final["best_epoch"], embeddings=emb))
    assert refit["val"] is None and refit["epochs_run"] == final["best_epoch"]
    meta = json.loads((Path(refit["run_dir"]) / "meta.json").read_text())
    assert meta["settings"]["train"]["fit_splits"] == "train_valid" and meta["settings"]["train"]["seed"] == 1
    res = tuning.run_eval(tuning.EvalJob(cfg, synth_dataset, "temporal", "learn_hybrid", refit["run_dir"],
                                         model_overrides={"mix_k": 5.0}, embeddings=emb))
    assert res["meta"]["model_overrides"] == {"mix_k": 5.0} and len(res["per_case"]["ranks"]) == res["meta"]["users"]


def test_results_do_not_depend_on_how_many_workers_run_them(settings, synth_dataset):
    """The benchmark spreads runs over worker processes: the same jobs give the same figures in a pool of two
    (one thread each) as one after another in this process."""
    cfg = small(settings)
    params = {**tuning.sample_configs(cfg, "sasrec", 1)[0], "train.batch_size": 32}
    jobs = [tuning.TrainJob(cfg, synth_dataset, "loo", "sasrec", {**params, **tuning.trial_controls(2, 2, seed, 0)}, 2,
                            keep=False) for seed in (0, 1)]
    threads = torch.get_num_threads()
    tuning.worker_init(1)
    try:
        alone = [tuning.run_job(j)["val_last"] for j in jobs]
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=tuning.worker_init) as pool:
        pooled = [r["val_last"] for r in pool.map(tuning.run_job, jobs)]
    assert pooled == alone and alone[0] != alone[1]  # and the seed does matter


# ------------------------------------------------------------------------------------------ comparison
def fake_cases(ranks_by_seed, users=None, cold=None):
    n = len(ranks_by_seed[0])
    users = np.arange(n) if users is None else users
    cold = np.arange(n) % 4 == 0 if cold is None else cold
    return [{"per_case": {"user_ids": users, "ranks": np.asarray(r),
                          "slices": {S.SLICE_ALL: np.ones(n, bool), S.SLICE_COLD_START: cold,
                                     S.SLICE_HEAD: np.zeros(n, bool)}}} for r in ranks_by_seed]


def test_summary_means_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(0, 300, size=n)
    good = fake_cases([np.maximum(base - 150, 0), np.maximum(base - 140, 0), np.maximum(base - 160, 0)])
    same = fake_cases([base])
    out = compare.summarise({"good": good, "base": same, "copy": fake_cases([base])}, ["recall@10", "ndcg@10"],
                            [("good", "base"), ("copy", "base")], n_boot=300)
    row = out["models"]["base"]["all"]
    assert row["cases"] == n and row["recall@10"] == pytest.approx(np.mean(base < 10))
    lo, hi = row["recall@10_ci"]
    assert lo <= row["recall@10"] <= hi and lo < hi
    assert out["models"]["good"]["cold_start"]["cases"] == 100
    assert "head" not in out["models"]["good"]  # a slice without cases is absent
    better = out["diffs"]["good_vs_base"]["all"]["recall@10"]
    assert better["verdict"] == "better" and better["lo"] > 0
    tie = out["diffs"]["copy_vs_base"]["all"]["ndcg@10"]
    assert tie == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "tie"}


def test_summary_refuses_results_on_other_cases():
    a = fake_cases([np.arange(10)])
    with pytest.raises(ValueError, match="other cases"):
        compare.summarise({"a": a, "b": fake_cases([np.arange(10)], users=np.arange(10) + 1)}, ["recall@10"])
    with pytest.raises(ValueError, match="slice 'cold_start' differs"):
        compare.summarise({"a": a, "b": fake_cases([np.arange(10)], cold=np.ones(10, bool))}, ["recall@10"])
    with pytest.raises(ValueError, match="cannot compare"):
        compare.summarise({"a": a}, ["recall@10"], [("a", "zzz")])
