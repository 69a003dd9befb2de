"""The evaluation protocol: what is known at each cut-off (cold-start items, cold users, the split k-core),
and the training-free baselines (recent popularity, item-kNN) by hand and through the harness and CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from learn_tasks import schema as S
from learn_tasks.cli import app
from learn_tasks.data import datasets as data
from learn_tasks.data import splits
from learn_tasks.evaluation import baselines, harness
from learn_tasks.pch.catalogue import Catalogue

DAY = 86_400
T0 = 1_600_000_000 - 1_600_000_000 % DAY  # a midnight


def write_dataset(folder: Path, events: list[tuple[int, int, int]], items: range) -> Path:
    """SeqRec CSVs from (user, item, day) events."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
                  "timestamp": [T0 + e[2] * DAY for e in events]}).to_csv(folder / "interactions.csv", index=False)
    pd.DataFrame({"item_id": list(items), "title": [f"item {i}" for i in items]}).to_csv(folder / "items.csv",
                                                                                          index=False)
    return folder


def day(d: int) -> str:
    return pd.Timestamp(T0 + d * DAY, unit="s", tz="UTC").isoformat()


# Validation cut-off day 10, test cut-off day 20. Items 100..107:
#   101 first seen in the validation window (day 12): cold at validation, known at test;
#   102 first seen after the test cut-off: cold at test; 103, 104 never interacted with.
EVENTS = [
    (1, 100, 1), (1, 105, 2), (1, 101, 12), (1, 102, 22),  # user 1: 2 train, 1 valid, 1 test event
    (2, 100, 1), (2, 105, 3), (2, 106, 4), (2, 107, 5), (2, 106, 14), (2, 101, 21),  # 4 train, 1 valid, 1 test
    (3, 100, 2), (3, 107, 3), (3, 105, 6),  # train only
]


@pytest.fixture
def timeline(settings, tmp_path):
    cfg = settings.with_overrides(data={"temporal_cutoff": day(20), "temporal_valid_cutoff": day(10)},
                                  evaluate={"cold_user_max_events": 3})
    data.prepare_dataset(cfg, "seqrec", write_dataset(tmp_path / "src", EVENTS, range(100, 108)), "timeline")
    return cfg


def by_user(result) -> dict[int, dict[str, bool]]:
    pc = result["per_case"]
    return {int(u): {s: bool(m[i]) for s, m in pc["slices"].items()} for i, u in enumerate(pc["user_ids"])}


def test_cold_start_means_first_seen_after_the_cut_off_and_cold_users_count_the_history_then(timeline):
    test = harness.evaluate_run(timeline, "timeline", "temporal", "popular", stage=S.TEST, write_report=False,
                                keep_cases=True)
    valid = harness.evaluate_run(timeline, "timeline", "temporal", "popular", stage=S.VALID, write_report=False,
                                 keep_cases=True)
    t, v = by_user(test), by_user(valid)
    assert sorted(t) == [1, 2] and sorted(v) == [1, 2]
    # test: item 102 (user 1's target) was never seen before day 20; item 101 (user 2's) was, on day 12
    assert t[1][S.SLICE_COLD_START] and not t[2][S.SLICE_COLD_START]
    # validation: item 101 (user 1's target) was never seen before day 10
    assert v[1][S.SLICE_COLD_START] and not v[2][S.SLICE_COLD_START]
    # cold users by the history at the time: user 1 has 3 events before day 20 (2 of them training
    # events), user 2 has 5 -- and at validation 2 and 4
    assert t[1][S.SLICE_COLD_USERS] and not t[2][S.SLICE_COLD_USERS]
    assert v[1][S.SLICE_COLD_USERS] and not v[2][S.SLICE_COLD_USERS]
    # the cold candidate pool: catalogue items with no event before the cut-off
    assert test["meta"]["cold_pool"] == 3  # 102, 103, 104
    assert valid["meta"]["cold_pool"] == 4  # 101 too
    assert test["meta"]["cutoff"].startswith(day(20)[:10])
    # popularity at test counts the validation window too: 101 was bought once before day 20
    assert test["per_case"]["ranks"][1] < valid["meta"]["items"]


def test_reference_times_of_prepared_data_are_unix_seconds(timeline):
    # what recent_popular's window counts back from: the cut-off (temporal) or just after the user's last
    # history event (loo), in seconds whatever resolution the prepared split stores
    ids = np.arange(100, 108)
    cat = Catalogue(ids, None, np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64))
    loo = harness.build_cases(splits.load_split(timeline, "timeline", "loo"), cat, "loo", S.TEST)
    want = {1: T0 + 12 * DAY + 1, 2: T0 + 14 * DAY + 1, 3: T0 + 3 * DAY + 1}
    assert dict(zip(loo.user_ids.tolist(), loo.ref_times.tolist())) == want
    temporal = harness.build_cases(splits.load_split(timeline, "timeline", "temporal"), cat, "temporal", S.TEST)
    assert temporal.ref_times.tolist() == [T0 + 20 * DAY] * len(temporal)


def test_split_kcore_looks_only_at_the_training_period(settings):
    # item 50 has one training event and many test events; a whole-timeline 2-core keeps it, a 2-core
    # of the training period alone drops its training event, and never filters later events
    rows = [(u, 60 + u % 2, 1) for u in range(1, 7)] + [(u, 61 - u % 2, 2) for u in range(1, 7)]
    rows += [(1, 50, 3)] + [(u, 50, 25) for u in range(2, 7)] + [(u, 62, 12) for u in range(1, 7)]
    inter = pd.DataFrame({S.USER_ID: [r[0] for r in rows], S.ITEM_ID: [r[1] for r in rows],
                          S.EVENT_TIMESTAMP: pd.to_datetime([T0 + r[2] * DAY for r in rows], unit="s", utc=True)})
    cfg = settings.with_overrides(data={"temporal_cutoff": day(20), "temporal_valid_cutoff": day(10),
                                        "split_kcore": 2})
    assert (data.kcore(inter, 2)[S.ITEM_ID] == 50).sum() == 6  # the whole timeline keeps it: look-ahead
    split = splits.split_temporal(inter, cfg)
    item50 = split[split[S.ITEM_ID] == 50]
    assert item50[S.SPLIT].tolist().count(S.DROPPED) == 1 and (item50[S.SPLIT] == S.TEST).sum() == 5
    assert (split[S.SPLIT] == S.VALID).sum() == 6 and (split[S.SPLIT] == S.TRAIN).sum() == 12
    # a dropped event is still something that happened before the cut-off: item 50 is no cold-start item
    known = harness.known_events(split, S.TEST)
    assert 50 in set(known[S.ITEM_ID]) and S.DROPPED in set(known[S.SPLIT])
    assert split.attrs["split_kcore"] == 2


# ------------------------------------------------------------------------------------------ baselines
def test_recent_popular_counts_the_window_before_each_reference_time():
    rows = np.array([0, 0, 1, 1, 1, 2])
    times = T0 + DAY * np.array([1, 2, 8, 9, 9, 10])
    score = baselines.recent_popular_scores(rows, times, T0 + DAY * np.array([3, 10]), 3, days=3)
    s = score(0, 2).numpy()
    # at day 3: window [day 0, day 3) holds item 0 twice; tie-break all-time counts / (max + 1) = 2 / 3
    assert s[0].tolist() == pytest.approx([2 + 2 / 3, 0.0, 0.0])
    # at day 10: window [day 7, day 10) holds item 1 three times; the event at day 10 is not before it
    assert s[1].tolist() == pytest.approx([0 + 2 / 4, 3 + 3 / 4, 0.0])
    with pytest.raises(ValueError, match="order"):
        baselines.recent_popular_scores(rows, times, T0 + DAY * np.array([10, 3]), 3, days=3)
    every = baselines.recent_popular_scores(rows, times, T0 + DAY * np.array([10]), 3, days=0)(0, 1).numpy()
    assert every[0].tolist() == pytest.approx([2 + 2 / 4, 3 + 3 / 4, 0.0])  # days=0: all time


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_unix_seconds_reads_the_unit_from_the_dtype(unit):
    # Prepared datasets hold microseconds; reading them as nanoseconds made every time 1000x too small,
    # so recent_popular's windows covered all history.
    stamps = pd.Series(pd.to_datetime([T0, T0 + DAY + 1, -1], unit="s", utc=True)).astype(f"datetime64[{unit}, UTC]")
    want = [T0, T0 + DAY + 1, -1]
    assert harness.unix_seconds(stamps).tolist() == want
    assert harness.unix_seconds(stamps.dt.tz_localize(None)).tolist() == want  # naive = UTC
    assert harness.unix_seconds(stamps.dt.tz_convert("Asia/Tokyo")).tolist() == want
    assert harness.unix_seconds([pd.Timestamp(T0, unit="s", tz="UTC"), "1970-01-01T00:00:01.5Z"]).tolist() == [T0, 1]
    with pytest.raises(ValueError, match="1 missing timestamp"):
        harness.unix_seconds(pd.concat([stamps, pd.Series([pd.NaT], dtype=stamps.dtype)]))


def test_item_knn_is_the_cosine_of_user_sets():
    # users 0: {0, 1}, 1: {0, 1, 2} (item 1 twice: counted once), 2: {2}; |U| = 2 for every item
    users, rows = np.array([0, 0, 1, 1, 1, 1, 2]), np.array([0, 1, 0, 1, 1, 2, 2])
    sim = baselines.cooccurrence_neighbours(users, rows, 4, neighbours=3).toarray()
    want = np.array([[0, 1, 0.5, 0], [1, 0, 0.5, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(sim, want, rtol=1e-6)
    top1 = baselines.cooccurrence_neighbours(users, rows, 4, neighbours=1).toarray()
    assert top1[0].tolist() == pytest.approx([0, 1, 0, 0]) and (top1 > 0).sum(1).tolist() == [1, 1, 1, 0]
    s = baselines.item_knn_scores(sparse_of(want), np.array([0, 2]), np.array([0, 1, 2]), 50,
                                  np.array([2, 2, 2, 0]))(0, 2).numpy()
    assert s[0][:3] == pytest.approx([1e-6, 1 + 1e-6, 0.5 + 1e-6]) and s[0][3] == 0.0
    assert s[1][:2] == pytest.approx([0.5, 0.5], abs=1e-5)


def sparse_of(a):
    from scipy import sparse

    return sparse.csr_matrix(np.asarray(a, np.float32))


@pytest.mark.parametrize("model", ["recent_popular", "item_knn"])
def test_new_baselines_through_the_harness_and_the_cli(settings, synth_dataset, model):
    res = CliRunner().invoke(app, ["evaluate", "--dataset", synth_dataset, "--protocol", "temporal", "--model", model,
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["meta"]["model"] == model and 0 <= out[S.SLICE_ALL]["recall@10"] <= 1
    assert "coverage@10" in out["coverage"] and out["meta"]["cold_pool"] >= 0
    pop = harness.evaluate_run(settings, synth_dataset, "loo", "popular", write_report=False)
    mine = harness.evaluate_run(settings, synth_dataset, "loo", model, write_report=False)
    assert mine["meta"]["users"] == pop["meta"]["users"]
    # neither can rank an item nobody interacted with before the reference time above a known one
    assert mine["coverage"]["cold_start_share@10"] == 0.0
    if model == "item_knn":  # co-occurrence sees the generated topics; popularity does not
        assert mine[S.SLICE_ALL]["recall@50"] > pop[S.SLICE_ALL]["recall@50"]
        assert mine["coverage"]["coverage@10"] > pop["coverage"]["coverage@10"]
    assert not math.isnan(mine[S.SLICE_ALL]["ndcg@200"])
