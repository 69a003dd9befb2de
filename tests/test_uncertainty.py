"""Uncertainty: per-case metric values and bootstrap intervals against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from learn_tasks.evaluation import metrics, uncertainty


def test_case_values_average_to_the_harness_metrics():
    ranks = np.array([0, 3, 12, 60])
    assert uncertainty.case_values(ranks, "recall@10").tolist() == [1.0, 1.0, 0.0, 0.0]
    ndcg = uncertainty.case_values(ranks, "ndcg@50")
    assert ndcg.tolist() == pytest.approx([1.0, 1 / math.log2(5), 1 / math.log2(14), 0.0])
    for m, f in (("recall@10", metrics.recall_at_k), ("ndcg@50", metrics.ndcg_at_k)):
        assert uncertainty.case_values(ranks, m).mean() == pytest.approx(f(ranks, int(m.split("@")[1])))
    with pytest.raises(ValueError):
        uncertainty.case_values(ranks, "mrr@10")


def test_a_constant_metric_has_a_zero_width_interval():
    mean, (lo, hi) = uncertainty.mean_ci(np.full(50, 0.25), n_boot=200)
    assert (mean, lo, hi) == (0.25, 0.25, 0.25)


def test_bootstrap_of_two_cases_matches_the_exact_distribution():
    # difference per case = [1, 0]: the mean of 2 draws is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1 and the replicates average 0.5
    reps = uncertainty.replicates([np.array([1.0, 0.0])], n_boot=4000, seed=1)[:, 0]
    assert set(np.unique(reps)) == {0.0, 0.5, 1.0}
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.03)
    assert reps.mean() == pytest.approx(0.5, abs=0.02)
    d = uncertainty.paired_difference([1.0, 0.0], [0.0, 0.0], n_boot=4000, seed=1)
    assert d == {"mean": 0.5, "lo": 0.0, "hi": 1.0}
    assert uncertainty.verdict(d) == "tie"  # the interval includes zero


def test_the_difference_is_paired_on_the_same_cases():
    # b is a plus a constant 0.1 on every case: the case noise cancels, the interval is exactly [-0.1, -0.1],
    # although each model alone has a wide interval
    rng = np.random.default_rng(0)
    a = rng.random(300)
    d = uncertainty.paired_difference(a, a + 0.1, n_boot=300)
    assert d["mean"] == pytest.approx(-0.1) and d["lo"] == pytest.approx(-0.1) and d["hi"] == pytest.approx(-0.1)
    assert uncertainty.verdict(d) == "worse" and uncertainty.verdict({"mean": 1, "lo": 0.1, "hi": 2}) == "better"
    _, (lo, hi) = uncertainty.mean_ci(a, n_boot=300)
    assert hi - lo > 0.05


def test_seeds_are_resampled_too():
    # two seeds that disagree completely on 4 identical cases: the cases carry no noise (every case is the
    # same within a seed), the seeds do: means of 2 seeds drawn with replacement are 0, 0.5 or 1
    values = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mean, (lo, hi) = uncertainty.mean_ci(values, n_boot=2000)
    assert mean == 0.5 and (lo, hi) == (0.0, 1.0)
    one_seed = np.array([[0.5, 0.5, 0.5, 0.5]])
    assert uncertainty.mean_ci(one_seed, n_boot=200)[1] == [0.5, 0.5]


def test_models_must_share_their_cases_and_results_are_reproducible():
    with pytest.raises(ValueError, match="same cases"):
        uncertainty.replicates([np.zeros(3), np.zeros(4)])
    a, b = np.random.default_rng(1).random((2, 100))
    assert uncertainty.paired_difference(a, b, seed=7) == uncertainty.paired_difference(a, b, seed=7)
    assert np.isnan(uncertainty.replicates([np.zeros(0)], n_boot=5)).all()


def test_paired_ratio():
    # b is half of a on every case: the ratio is exactly 2 in every replicate
    a = np.random.default_rng(2).random(100) + 0.5
    r = uncertainty.paired_ratio(a, a / 2, n_boot=200)
    assert r["mean"] == pytest.approx(2.0) and r["lo"] == pytest.approx(2.0) and r["hi"] == pytest.approx(2.0)
    wide = uncertainty.paired_ratio([1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], n_boot=500)
    assert wide["mean"] == pytest.approx(1.0) and wide["lo"] < 1.0 < wide["hi"]
