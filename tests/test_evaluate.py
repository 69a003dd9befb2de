"""Evaluation: metric functions against hand-computed values, slices, full ranking, cases, outputs, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from learn_tasks.evaluation import harness, metrics
from learn_tasks.pch import catalogue
from learn_tasks import schema as S
from learn_tasks.cli import app


# ------------------------------------------------------------------------------------------- metrics
def test_rank_metrics_match_hand_computed_values():
    ranks = np.array([0, 3, 12, 60])
    assert metrics.recall_at_k(ranks, 10) == 0.5
    assert metrics.hit_rate_at_k(ranks, 50) == 0.75
    assert metrics.recall_at_k(ranks, 200) == 1.0
    assert metrics.ndcg_at_k(ranks, 10) == pytest.approx((1 / math.log2(2) + 1 / math.log2(5)) / 4)
    assert metrics.ndcg_at_k(ranks, 50) == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 4)
    assert metrics.mrr(ranks) == pytest.approx((1 + 1 / 4 + 1 / 13 + 1 / 61) / 4)
    assert math.isnan(metrics.recall_at_k(np.array([]), 10))


def test_set_metrics_coverage_and_shares():
    topk = np.array([[1, 2, 3], [1, 4, 5]])
    assert metrics.set_recall_at_k(topk, [np.array([2, 9]), np.array([5])], 2) == pytest.approx((0.5 + 0.0) / 2)
    assert metrics.set_recall_at_k(topk, [np.array([2, 9]), np.array([5])], 3) == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.coverage_at_k(topk, 10, 2) == pytest.approx(3 / 10)  # items 1, 2, 4
    member = np.zeros(10, bool)
    member[[4, 5]] = True
    assert metrics.share_at_k(topk, member, 3) == pytest.approx(2 / 6)


def test_long_tail_and_item_slices():
    pop = np.array([0, 1, 1, 2, 6, 10])  # 20 training events; 20% = 4
    assert catalogue.tail_mask(pop, 0.2).tolist() == [False, True, True, True, False, False]
    train = pd.DataFrame({S.ITEM_ID: np.repeat([11, 12, 13, 14, 15], [1, 1, 2, 6, 10])})
    slices = catalogue.item_slices(train, np.array([15, 10, 11, 12, 13, 14]), 0.2)
    assert slices[S.SLICE_COLD_START].tolist() == [10]
    assert slices[S.SLICE_LONG_TAIL].tolist() == [11, 12, 13]
    assert slices[S.SLICE_HEAD].tolist() == [14, 15]


# ------------------------------------------------------------------------------------ full ranking
def cases_of(histories, targets):
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    flat = np.concatenate([np.asarray(h, np.int64) for h in histories])
    return harness.Cases(np.arange(len(targets)), offsets, flat, np.asarray(targets))


def test_rank_all_excludes_history_and_breaks_ties_at_the_middle():
    items = np.array([[5.0], [4.0], [3.0], [2.0], [1.0], [1.0], [1.0], [1.0]])
    users = np.ones((3, 1))
    cases = cases_of([[0], [0, 1], [3]], targets=[2, 2, 7])
    r = harness.rank_all(users, items, cases, k_max=3)
    # user 0: item 0 excluded -> only item 1 beats item 2; user 1: items 0, 1 excluded -> first
    assert r.ranks[:2].tolist() == [1, 0]
    # user 2: items 0, 1, 2 beat the target; it ties with 3 others -> expected rank 3 + 3 // 2
    assert r.ranks[2] == 4
    assert r.topk[1][:2].tolist() == [2, 3]
    assert 0 not in r.topk[0] and 3 not in r.topk[2]


def test_a_target_already_in_the_history_stays_rankable():
    items = np.array([[3.0], [2.0], [1.0]])
    r = harness.rank_all(np.ones((1, 1)), items, cases_of([[0, 1]], [0]), k_max=2)
    assert r.ranks.tolist() == [0]


def split_frame():
    t = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [  # user, item, day, split
        (1, 10, 0, S.TRAIN), (1, 11, 1, S.TRAIN), (1, 12, 2, S.VALID), (1, 13, 3, S.TEST), (1, 14, 4, S.TEST),
        (2, 10, 0, S.TRAIN), (2, 15, 3, S.TEST),
        (3, 16, 3, S.TEST),  # no history: not a case
        (4, 11, 0, S.TRAIN), (4, 12, 1, S.VALID),
    ]
    return pd.DataFrame({S.USER_ID: [r[0] for r in rows], S.ITEM_ID: [r[1] for r in rows],
                         S.EVENT_TIMESTAMP: [t + pd.Timedelta(days=r[2]) for r in rows],
                         S.SPLIT: [r[3] for r in rows]})


def test_build_cases_for_test_and_valid():
    df = split_frame()
    ids = np.arange(10, 17)
    pop = catalogue.item_popularity(df[df[S.SPLIT] == S.TRAIN], ids)
    cat = catalogue.Catalogue(ids, None, np.zeros(7, np.int64), pop)
    test = harness.build_cases(df, cat, "temporal", S.TEST)
    assert test.user_ids.tolist() == [1, 2]
    assert [ids[test.history(i)].tolist() for i in range(2)] == [[10, 11, 12], [10]]
    assert ids[test.target_rows].tolist() == [13, 15]  # the first event after the cut-off
    assert [ids[f].tolist() for f in test.future] == [[13, 14], [15]]
    assert test.history_events.tolist() == [3, 1]  # events known at the test cut-off, valid ones included
    valid = harness.build_cases(df, cat, "loo", S.VALID)
    assert valid.user_ids.tolist() == [1, 4] and valid.future is None
    assert [ids[valid.history(i)].tolist() for i in range(2)] == [[10, 11], [11]]


def test_slices_without_cases_are_absent_not_zero():
    df = split_frame()
    ids = np.arange(10, 17)
    pop = catalogue.item_popularity(df[df[S.SPLIT] == S.TRAIN], ids)
    cat = catalogue.Catalogue(ids, None, np.zeros(7, np.int64), pop)
    cases = harness.build_cases(df, cat, "loo", S.VALID)  # targets: item 12 twice, a cold item (0 train events)
    ranked = harness.rank_all(np.ones((len(cases), 1)), cat.popularity[:, None].astype(float), cases, 5)
    out = harness.slice_metrics(ranked, cases, cat, (1, 5), 0.2, 3)
    assert set(out) >= {S.SLICE_ALL, S.SLICE_COLD_START, S.SLICE_COLD_USERS, "coverage", "popularity_buckets"}
    assert S.SLICE_HEAD not in out and S.SLICE_LONG_TAIL not in out
    assert out[S.SLICE_ALL]["cases"] == 2


# ---------------------------------------------------------------------------- harness on real data
def topic_embeddings(cfg, dataset, dim=16, seed=0):
    from learn_tasks.data import datasets as data

    items = data.load_items(cfg, dataset)
    rng = np.random.default_rng(seed)
    topics = {t: i for i, t in enumerate(sorted(items[S.CATEGORY].astype(str).unique()))}
    emb = rng.normal(size=(len(topics), dim))[items[S.CATEGORY].astype(str).map(topics).to_numpy()]
    emb = emb + 0.5 * rng.normal(size=emb.shape)
    return items[S.ITEM_ID].to_numpy(np.int64), (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def test_baselines_through_the_harness_write_metrics_and_report(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    pop = harness.evaluate_run(settings, synth_dataset, "temporal", "popular")
    knn = harness.evaluate_run(settings, synth_dataset, "temporal", "content_knn", embeddings=emb)
    for m in (pop, knn):
        assert set(m[S.SLICE_ALL]) >= {"recall@10", "recall@50", "recall@200", "ndcg@10", "ndcg@200", "mrr", "hr@10"}
        assert "future" in m and "coverage@10" in m["coverage"]
        report = m["meta"]["report"]
        for name in ("metrics.json", "report.md", "recall_by_popularity.svg"):
            assert (settings.paths.reports("eval") / synth_dataset).exists()
            assert (Path(report) / name).exists(), name
    # popularity can never recommend a cold-start item; content-kNN can
    assert pop["coverage"]["cold_start_share@200"] == 0.0
    if S.SLICE_COLD_START in pop:
        assert pop[S.SLICE_COLD_START]["recall@10"] == 0.0
    assert knn["coverage"]["cold_start_share@200"] > 0.0
    assert knn[S.SLICE_ALL]["recall@10"] > 10 / knn["meta"]["items"]
    assert pop["coverage"]["coverage@10"] < knn["coverage"]["coverage@10"]
    svg = (Path(pop["meta"]["report"]) / "recall_by_popularity.svg").read_text()
    assert svg.startswith("<svg") and "recall@50" in svg


def test_evaluate_cli_prints_the_metrics_object(settings, synth_dataset):
    res = CliRunner().invoke(app, ["evaluate", "--dataset", synth_dataset, "--protocol", "loo", "--model", "popular",
                                   "--max-users", "50", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["meta"]["users"] == 50 and 0 <= out["all"]["recall@10"] <= 1
    bad = CliRunner().invoke(app, ["evaluate", "--dataset", synth_dataset, "--model", "learn"])
    assert bad.exit_code == 2 and "learn train" in bad.output
