"""The evaluation harness: test cases, full ranking, metrics by slice, scorers and :func:`evaluate_run`.

Every model, neural or baseline, is reduced to two matrices: user vectors (one per test case) and item
vectors (one per catalogue item). The score of an item is their exact dot product, computed against the
*whole* catalogue; items already in the user's history are excluded (set to -inf) except the target
itself, so a repeated purchase stays rankable. Ties are broken at the middle (the expected rank under a
random order), so a model that gives many items the same score -- popularity on cold items, one shared
unknown-item embedding -- gains nothing from ties.

Protocols (from :func:`learn_tasks.data.splits.load_split`):

* ``loo``       test: history = every event but the last, target = the last; valid: history = train events,
                target = the second-to-last event;
* ``temporal``  test: every user with events on both sides of the cut-off; history = all events before it,
                target = the first event after it (``future`` also reports Recall@K against every item the
                user has after the cut-off); valid: the same with the validation cut-off.

Slices of test cases: ``cold_start`` (the target has 0 training interactions), ``long_tail`` (the target is
among the least popular warm items that together hold ``tail_share`` of training interactions), ``head``
(the other warm items), ``cold_users`` (users with <= ``cold_user_max_events`` training events). A slice
with no case is absent from the output, not zero. Item slices and the catalogue are defined in
:mod:`learn_tasks.pch.catalogue`, the metric functions in :mod:`learn_tasks.evaluation.metrics`, the written
outputs in :mod:`learn_tasks.evaluation.report`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from learn_tasks import schema as S
from learn_tasks.config import BASELINE_KINDS, EVAL_KINDS, MODEL_KINDS, Settings
from learn_tasks.data import splits
from learn_tasks.evaluation import baselines
from learn_tasks.evaluation.metrics import (coverage_at_k, rank_metrics, recall_at_k, set_recall_at_k,
                                            share_at_k)
from learn_tasks.evaluation.report import write_outputs
from learn_tasks.pch import registry
from learn_tasks.pch.catalogue import Catalogue, baseline_catalogue, checkpoint_catalogue, tail_mask
from learn_tasks.pch.model import load_checkpoint
from learn_tasks.storage import read_json

POPULARITY_BUCKETS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


# ==================================================================================================
# Evaluation cases
# ==================================================================================================
@dataclass
class Cases:
    """Per evaluated user: history (catalogue rows, oldest first), one target row, optional future rows."""

    user_ids: np.ndarray  # [U]
    hist_offsets: np.ndarray  # [U + 1]
    hist_rows: np.ndarray  # concatenated histories
    target_rows: np.ndarray  # [U]
    train_events: np.ndarray  # [U] training events of the user
    future: list[np.ndarray] | None = None  # temporal: every target-side row

    def __len__(self) -> int:
        return len(self.user_ids)

    def history(self, i: int) -> np.ndarray:
        return self.hist_rows[self.hist_offsets[i]:self.hist_offsets[i + 1]]

    def subset(self, keep: np.ndarray) -> "Cases":
        hists = [self.history(i) for i in keep]
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in hists])]).astype(np.int64)
        return Cases(self.user_ids[keep], offsets,
                     np.concatenate(hists) if hists else np.zeros(0, np.int64),
                     self.target_rows[keep], self.train_events[keep],
                     [self.future[i] for i in keep] if self.future is not None else None)


def build_cases(split: pd.DataFrame, cat: Catalogue, protocol: str, stage: str = S.TEST) -> Cases:
    """Evaluation cases of ``stage`` (test or valid) under ``protocol`` from a split interactions frame."""
    if stage not in (S.TEST, S.VALID):
        raise ValueError(f"stage must be {S.TEST!r} or {S.VALID!r}, got {stage!r}")
    df = split.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    hist_splits = (S.TRAIN, S.VALID) if stage == S.TEST else (S.TRAIN,)
    tgt = df[df[S.SPLIT] == stage]
    hist = df[df[S.SPLIT].isin(hist_splits)]
    first = tgt.groupby(S.USER_ID, sort=True).head(1)
    users = np.intersect1d(first[S.USER_ID].to_numpy(), hist[S.USER_ID].unique())
    first = first[first[S.USER_ID].isin(users)]
    hist = hist[hist[S.USER_ID].isin(users)]
    counts = hist.groupby(S.USER_ID, sort=True).size().reindex(users).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    train_events = (df[df[S.SPLIT] == S.TRAIN].groupby(S.USER_ID).size().reindex(users, fill_value=0)
                    .to_numpy(np.int64))
    future = None
    if protocol == S.PROTOCOL_TEMPORAL:
        t = tgt[tgt[S.USER_ID].isin(users)]
        rows = cat.rows(t[S.ITEM_ID].to_numpy())
        bounds = np.concatenate([[0], np.cumsum(t.groupby(S.USER_ID, sort=True).size().reindex(users).to_numpy())])
        future = [np.unique(rows[bounds[i]:bounds[i + 1]]) for i in range(len(users))]
    return Cases(users.astype(np.int64), offsets, cat.rows(hist[S.ITEM_ID].to_numpy()),
                 cat.rows(first[S.ITEM_ID].to_numpy()), train_events, future)


def sample_cases(cases: Cases, max_users: int, seed: int = 0) -> Cases:
    if not max_users or len(cases) <= max_users:
        return cases
    keep = np.sort(np.random.default_rng(seed).choice(len(cases), size=max_users, replace=False))
    return cases.subset(keep)


# ==================================================================================================
# Scoring: user vectors x item vectors, exact, over the whole catalogue
# ==================================================================================================
@dataclass
class Ranked:
    ranks: np.ndarray  # [U] 0-based rank of the target
    topk: np.ndarray  # [U, K] catalogue rows, best first


def rank_all(user_vecs, item_vecs, cases: Cases, k_max: int, batch: int = 1024) -> Ranked:
    """Rank the whole catalogue for every case; history items other than the target are excluded."""
    users = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32))
    items = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32))
    n = items.shape[0]
    k_max = min(k_max, n)
    ranks, tops = [], []
    with torch.no_grad():
        for lo in range(0, len(cases), batch):
            hi = min(lo + batch, len(cases))
            scores = users[lo:hi] @ items.T  # [b, N]
            seg = cases.hist_rows[cases.hist_offsets[lo]:cases.hist_offsets[hi]]
            owner = np.repeat(np.arange(hi - lo), np.diff(cases.hist_offsets[lo:hi + 1]))
            tgt = torch.as_tensor(cases.target_rows[lo:hi])
            keep = seg != cases.target_rows[lo:hi][owner]
            scores[torch.as_tensor(owner[keep]), torch.as_tensor(seg[keep])] = float("-inf")
            t = scores[torch.arange(hi - lo), tgt][:, None]
            greater = (scores > t).sum(1, dtype=torch.int32)  # int32 sums are twice as fast as bool -> int64
            ties = (scores == t).sum(1, dtype=torch.int32) - 1
            ranks.append((greater + ties // 2).numpy())
            tops.append(scores.topk(k_max, dim=1).indices.numpy())
    return Ranked(np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
                  np.concatenate(tops) if tops else np.zeros((0, k_max), np.int64))


def padded_histories(cases: Cases, which: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned [b, L] catalogue rows of the most recent ``max_len`` events of cases ``which``, and the mask."""
    hists = [cases.history(i)[-max_len:] for i in which]
    L = max(1, max(len(h) for h in hists))
    rows = np.zeros((len(hists), L), dtype=np.int64)
    mask = np.zeros((len(hists), L), dtype=bool)
    for j, h in enumerate(hists):
        rows[j, :len(h)] = h
        mask[j, :len(h)] = True
    return rows, mask


def model_vectors(model, cat: Catalogue, cases: Cases, batch: int = 1024, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """User vectors for ``cases`` and item vectors for the whole catalogue from a PCH model."""
    c = model.config
    content = torch.as_tensor(cat.content) if c.uses_content else None
    idx = torch.as_tensor(cat.item_idx)
    was_training = model.training
    model.eval()
    items, users = [], []
    with torch.no_grad():
        for lo in range(0, len(cat), 8192):
            sl = slice(lo, lo + 8192)
            items.append(model.encode_items(content[sl].to(device) if content is not None else None,
                                            idx[sl].to(device)).float().cpu())
        # Users in order of history length, so a batch is padded only to similar lengths.
        order = np.argsort(np.minimum(np.diff(cases.hist_offsets), c.max_len), kind="stable")
        for lo in range(0, len(cases), batch):
            rows, mask = padded_histories(cases, order[lo:lo + batch], c.max_len)
            r = torch.as_tensor(rows)
            users.append(model.encode_users(content[r].to(device) if content is not None else None,
                                            torch.as_tensor(mask).to(device), idx[r].to(device)).float().cpu())
    model.train(was_training)
    out = np.zeros((len(cases), c.vector_dim), np.float32)
    if users:
        out[order] = torch.cat(users).numpy()
    return out, torch.cat(items).numpy()


# ==================================================================================================
# Metrics over slices
# ==================================================================================================
def case_slices(cases: Cases, popularity: np.ndarray, tail: np.ndarray, cold_user_max_events: int) -> dict[str, np.ndarray]:
    pop_t = popularity[cases.target_rows]
    return {
        S.SLICE_ALL: np.ones(len(cases), dtype=bool),
        S.SLICE_COLD_START: pop_t == 0,
        S.SLICE_LONG_TAIL: tail[cases.target_rows],
        S.SLICE_HEAD: (pop_t > 0) & ~tail[cases.target_rows],
        S.SLICE_COLD_USERS: cases.train_events <= cold_user_max_events,
    }


def slice_metrics(ranked: Ranked, cases: Cases, cat: Catalogue, ks: Sequence[int], tail_share: float,
                  cold_user_max_events: int) -> dict[str, Any]:
    tail = tail_mask(cat.popularity, tail_share)
    out: dict[str, Any] = {}
    for name, m in case_slices(cases, cat.popularity, tail, cold_user_max_events).items():
        if m.any():  # a slice with no case is absent, not zero
            out[name] = rank_metrics(ranked.ranks[m], ks)
    cov: dict[str, float] = {}
    cold = cat.popularity == 0
    for k in ks:
        cov[f"coverage@{k}"] = coverage_at_k(ranked.topk, len(cat), k)
        cov[f"cold_start_share@{k}"] = share_at_k(ranked.topk, cold, k)
        cov[f"long_tail_share@{k}"] = share_at_k(ranked.topk, tail, k)
    out["coverage"] = cov
    if cases.future is not None:
        out["future"] = {f"recall@{k}": set_recall_at_k(ranked.topk, cases.future, k) for k in ks}
    buckets = []
    pop_t = cat.popularity[cases.target_rows]
    for lo, hi in POPULARITY_BUCKETS:
        m = (pop_t >= lo) & ((pop_t <= hi) if hi is not None else True)
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f">{lo - 1}")
        buckets.append({"bucket": label, "cases": int(m.sum()),
                        **{f"recall@{k}": (recall_at_k(ranked.ranks[m], k) if m.any() else None) for k in ks}})
    out["popularity_buckets"] = buckets
    return out


# ==================================================================================================
# Scorers: a neural checkpoint or a baseline -> (user vectors, item vectors)
# ==================================================================================================
@dataclass
class Scorer:
    name: str
    vectors: Callable[[Cases], tuple[np.ndarray, np.ndarray]]
    cat: Catalogue
    run_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def make_scorer(cfg: Settings, dataset: str, protocol: str, model: str, split: pd.DataFrame,
                run_dir: Path | None = None, embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> Scorer:
    """A baseline, or a trained run of ``model`` (the latest under ``protocol`` unless ``run_dir`` is given)."""
    if model in BASELINE_KINDS:
        cat = baseline_catalogue(cfg, dataset, split, model == "content_knn", embeddings)
        if model == "popular":
            fn = lambda cases: baselines.popular_vectors(cat.popularity, len(cases))  # noqa: E731
        else:
            fn = lambda cases: baselines.content_knn_vectors(  # noqa: E731
                cat.content, cases.hist_rows, cases.hist_offsets, cfg.model.max_len)
        return Scorer(model, fn, cat, None, {"fingerprint": cat.fingerprint})
    if model not in MODEL_KINDS:
        raise ValueError(f"unknown model {model!r}; choose one of {EVAL_KINDS}")
    if run_dir is None:
        run_dir = registry.latest(cfg, dataset, kind=model, protocol=protocol)
        if run_dir is None:
            raise FileNotFoundError(f"no trained {model!r} run for dataset {dataset!r} under protocol {protocol!r}; "
                                    f"run `learn train --dataset {dataset} --protocol {protocol} --model {model}`")
    run_dir = Path(run_dir)
    net, pcfg = load_checkpoint(run_dir)
    cat = checkpoint_catalogue(cfg, dataset, run_dir, split, pcfg.uses_content, embeddings)
    return Scorer(pcfg.kind, lambda cases: model_vectors(net, cat, cases, cfg.evaluate.batch_users), cat, run_dir,
                  {"fingerprint": cat.fingerprint, "config": read_json(run_dir / "config.json")})


# ==================================================================================================
# Entry point
# ==================================================================================================
def evaluate_cases(scorer: Scorer, cases: Cases, cfg: Settings) -> dict[str, Any]:
    """Rank the catalogue for ``cases`` with ``scorer`` and compute the metrics of every slice."""
    e = cfg.evaluate
    user_vecs, item_vecs = scorer.vectors(cases)
    ranked = rank_all(user_vecs, item_vecs, cases, max(e.ks), e.batch_users)
    return slice_metrics(ranked, cases, scorer.cat, e.ks, e.tail_share, e.cold_user_max_events)


def evaluate_run(cfg: Settings, dataset: str, protocol: str, model: str | None = None,
                 run_dir: str | Path | None = None, stage: str = S.TEST,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None, write_report: bool = True) -> dict[str, Any]:
    """Evaluate a trained run (latest of ``model`` by default) or a baseline; write metrics.json and a report.

    Returns ``{slice: {"recall@10", "hr@10", "ndcg@10", ..., "mrr", "cases"}, "coverage": {...},
    "popularity_buckets": [...], "meta": {...}}`` (+ ``"future"`` under the temporal protocol).
    ``model`` defaults to ``pipeline.model``.
    """
    model = model or cfg.pipeline.model
    split = splits.load_split(cfg, dataset, protocol)
    scorer = make_scorer(cfg, dataset, protocol, model, split, Path(run_dir) if run_dir else None, embeddings)
    cases = build_cases(split, scorer.cat, protocol, stage)
    if not len(cases):
        raise ValueError(f"dataset {dataset!r} has no {stage} cases under protocol {protocol!r}")
    n_all = len(cases)
    cases = sample_cases(cases, cfg.evaluate.max_users, cfg.train.seed)
    result = evaluate_cases(scorer, cases, cfg)
    result["meta"] = {
        "dataset": dataset, "protocol": protocol, "stage": stage, "model": scorer.name,
        "run_dir": str(scorer.run_dir) if scorer.run_dir else None, "users": len(cases), "users_available": n_all,
        "items": len(scorer.cat), "ks": list(cfg.evaluate.ks), "tail_share": cfg.evaluate.tail_share,
        "cold_user_max_events": cfg.evaluate.cold_user_max_events,
        "embedding_fingerprint": scorer.info.get("fingerprint"),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    if write_report:
        result["meta"]["report"] = str(write_outputs(cfg, result, scorer))
    return result
