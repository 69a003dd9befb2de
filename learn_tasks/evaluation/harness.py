"""The evaluation harness: test cases, full ranking, metrics by slice, scorers and :func:`evaluate_run`.

Every model gives each test case a score for *every* catalogue item: a neural model (and popularity,
content-kNN) as the exact dot product of a user vector and the item vectors, the score-based baselines
(recent popularity, item-kNN) directly (:mod:`learn_tasks.evaluation.baselines`). Items already in the
user's history are excluded (set to -inf) except the target itself, so a repeated purchase stays
rankable. Ties are broken at the middle (the expected rank under a random order), so a model that gives
many items the same score -- popularity on cold items, one shared unknown-item embedding -- gains
nothing from ties.

Protocols (from :func:`learn_tasks.data.splits.load_split`):

* ``loo``       test: history = every event but the last, target = the last; valid: history = train events,
                target = the second-to-last event;
* ``temporal``  test: every user with events on both sides of the cut-off; history = all events before it,
                target = the first event after it (``future`` also reports Recall@K against every item the
                user has after the cut-off); valid: the same with the validation cut-off.

Slices are defined by what is *known at the stage*, never by what a model was trained on: the known
events are those before the stage's targets (``temporal``: every event before the cut-off, including
training-period events outside a split k-core; ``loo``: the train events for validation, train + valid
for test). ``cold_start``: the target has no known event (under ``temporal``: it is first seen after the
cut-off); ``long_tail``: the target is among the least popular known items that together hold
``tail_share`` of the known events; ``head``: the other known items; ``cold_users``: the user's history
at that time has <= ``cold_user_max_events`` events. A slice with no case is absent from the output, not
zero. ``meta.cold_pool`` is the number of catalogue items with no known event: the candidates a
cold-start target competes with for the model that can rank them. Item slices and the catalogue are
defined in :mod:`learn_tasks.pch.catalogue`, the metric functions in :mod:`learn_tasks.evaluation.metrics`,
the written outputs in :mod:`learn_tasks.evaluation.report`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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
from learn_tasks.evaluation.baselines import ScoreFn
from learn_tasks.evaluation.metrics import (coverage_at_k, rank_metrics, recall_at_k, set_recall_at_k,
                                            share_at_k)
from learn_tasks.evaluation.report import write_outputs
from learn_tasks.pch import registry
from learn_tasks.pch.catalogue import (Catalogue, baseline_catalogue, checkpoint_catalogue, item_popularity,
                                       tail_mask)
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
    future: list[np.ndarray] | None = None  # temporal: every target-side row
    ref_times: np.ndarray | None = None  # [U] unix s: only events before it are known (cut-off / last history event)

    def __len__(self) -> int:
        return len(self.user_ids)

    def history(self, i: int) -> np.ndarray:
        return self.hist_rows[self.hist_offsets[i]:self.hist_offsets[i + 1]]

    @property
    def history_events(self) -> np.ndarray:
        """[U] events in each user's history at the stage (the ``cold_users`` criterion)."""
        return np.diff(self.hist_offsets)

    def subset(self, keep: np.ndarray) -> "Cases":
        hists = [self.history(i) for i in keep]
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in hists])]).astype(np.int64)
        return Cases(self.user_ids[keep], offsets,
                     np.concatenate(hists) if hists else np.zeros(0, np.int64),
                     self.target_rows[keep], [self.future[i] for i in keep] if self.future is not None else None,
                     self.ref_times[keep] if self.ref_times is not None else None)


HISTORY_SPLITS = {S.TEST: (S.TRAIN, S.VALID), S.VALID: (S.TRAIN,)}


def known_events(split: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The events known before the stage's targets: its history splits and dropped training-period events."""
    return split[split[S.SPLIT].isin(HISTORY_SPLITS[stage] + (S.DROPPED,))]


def stage_cutoff(split: pd.DataFrame, protocol: str, stage: str) -> pd.Timestamp | None:
    """The temporal split's cut-off of ``stage`` (None under ``loo``)."""
    if protocol != S.PROTOCOL_TEMPORAL:
        return None
    value = split.attrs.get("test_cutoff" if stage == S.TEST else "valid_cutoff")
    if value is None:  # attrs lost: the first target time is the cut-off's lower bound, and all we need
        return split.loc[split[S.SPLIT] == stage, S.EVENT_TIMESTAMP].min()
    return pd.Timestamp(value)


def unix_seconds(ts) -> np.ndarray:
    """Whole seconds since the epoch (floored) of timestamps in any resolution; naive ones are UTC.

    Prepared datasets hold microsecond timestamps (Parquet's), others nanoseconds: the unit comes from the
    dtype, never from an assumed ``10**9`` ticks per second.
    """
    s = pd.Series(ts)
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif not pd.api.types.is_datetime64_dtype(s.dtype):  # strings, Timestamps, datetimes
        s = pd.to_datetime(s, utc=True).dt.tz_localize(None)
    if s.isna().any():
        raise ValueError(f"{int(s.isna().sum())} missing timestamp(s): every event needs its time")
    return s.to_numpy("datetime64[s]").astype(np.int64)


def build_cases(split: pd.DataFrame, cat: Catalogue, protocol: str, stage: str = S.TEST) -> Cases:
    """Evaluation cases of ``stage`` (test or valid) under ``protocol`` from a split interactions frame."""
    if stage not in (S.TEST, S.VALID):
        raise ValueError(f"stage must be {S.TEST!r} or {S.VALID!r}, got {stage!r}")
    df = split.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    hist_splits = HISTORY_SPLITS[stage]
    tgt = df[df[S.SPLIT] == stage]
    hist = df[df[S.SPLIT].isin(hist_splits)]
    first = tgt.groupby(S.USER_ID, sort=True).head(1)
    users = np.intersect1d(first[S.USER_ID].to_numpy(), hist[S.USER_ID].unique())
    first = first[first[S.USER_ID].isin(users)]
    hist = hist[hist[S.USER_ID].isin(users)]
    counts = hist.groupby(S.USER_ID, sort=True).size().reindex(users).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cutoff = stage_cutoff(split, protocol, stage)
    if cutoff is not None:  # temporal: everything before the cut-off is known
        ref = np.full(len(users), int(unix_seconds([cutoff])[0]), np.int64)
    else:  # loo: what happened up to the user's last history event (its time included)
        ref = unix_seconds(hist.groupby(S.USER_ID, sort=True)[S.EVENT_TIMESTAMP].max().reindex(users)) + 1
    future = None
    if protocol == S.PROTOCOL_TEMPORAL:
        t = tgt[tgt[S.USER_ID].isin(users)]
        rows = cat.rows(t[S.ITEM_ID].to_numpy())
        bounds = np.concatenate([[0], np.cumsum(t.groupby(S.USER_ID, sort=True).size().reindex(users).to_numpy())])
        future = [np.unique(rows[bounds[i]:bounds[i + 1]]) for i in range(len(users))]
    return Cases(users.astype(np.int64), offsets, cat.rows(hist[S.ITEM_ID].to_numpy()),
                 cat.rows(first[S.ITEM_ID].to_numpy()), future, ref)


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
    """Rank the whole catalogue for every case by user x item dot products (see :func:`rank_scores`)."""
    users = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32))
    items = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32))
    return rank_scores(lambda lo, hi: users[lo:hi] @ items.T, items.shape[0], cases, k_max, batch)


def rank_scores(score: ScoreFn, n: int, cases: Cases, k_max: int, batch: int = 1024) -> Ranked:
    """Rank the whole catalogue (``n`` items) for every case; ``score(lo, hi)`` gives the [hi - lo, n] scores
    of cases lo..hi-1 (called in increasing order), a tensor of its own: history items other than the target
    are excluded by overwriting their scores in place. ``k_max`` 0 skips the top lists (``topk`` [U, 0])."""
    k_max = min(k_max, n)
    ranks, tops = [], []
    with torch.no_grad():
        for lo in range(0, len(cases), batch):
            hi = min(lo + batch, len(cases))
            scores = score(lo, hi)  # [b, N]
            seg = cases.hist_rows[cases.hist_offsets[lo]:cases.hist_offsets[hi]]
            owner = np.repeat(np.arange(hi - lo), np.diff(cases.hist_offsets[lo:hi + 1]))
            tgt = torch.as_tensor(cases.target_rows[lo:hi])
            keep = seg != cases.target_rows[lo:hi][owner]
            scores[torch.as_tensor(owner[keep]), torch.as_tensor(seg[keep])] = float("-inf")
            t = scores[torch.arange(hi - lo), tgt][:, None]
            greater = (scores > t).sum(1, dtype=torch.int32)  # int32 sums are twice as fast as bool -> int64
            ties = (scores == t).sum(1, dtype=torch.int32) - 1
            ranks.append((greater + ties // 2).numpy())
            if k_max:  # k_max 0: ranks only (the gate needs no top lists)
                tops.append(scores.topk(k_max, dim=1).indices.numpy())
    return Ranked(np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
                  np.concatenate(tops) if tops else np.zeros((0 if k_max else len(cases), k_max), np.int64))


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


def model_vectors(model, cat: Catalogue, cases: Cases, batch: int = 1024, device: str = "cpu",
                  items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """User vectors for ``cases`` and item vectors for the whole catalogue from a PCH model (``items``: the
    catalogue's vectors from an earlier call with the same model, returned as they are)."""
    c = model.config
    content = torch.as_tensor(cat.content) if c.uses_content else None
    idx = torch.as_tensor(cat.item_idx)
    was_training = model.training
    model.eval()
    item_parts, users = [], []
    with torch.no_grad():
        for lo in range(0, len(cat) if items is None else 0, 8192):
            sl = slice(lo, lo + 8192)
            item_parts.append(model.encode_items(content[sl].to(device) if content is not None else None,
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
    return out, (items if items is not None else torch.cat(item_parts).numpy())


# ==================================================================================================
# Metrics over slices
# ==================================================================================================
def case_slices(cases: Cases, popularity: np.ndarray, tail: np.ndarray, cold_user_max_events: int) -> dict[str, np.ndarray]:
    """Boolean case masks of every slice; ``popularity`` [N] = known events of each item at the stage."""
    pop_t = popularity[cases.target_rows]
    return {
        S.SLICE_ALL: np.ones(len(cases), dtype=bool),
        S.SLICE_COLD_START: pop_t == 0,
        S.SLICE_LONG_TAIL: tail[cases.target_rows],
        S.SLICE_HEAD: (pop_t > 0) & ~tail[cases.target_rows],
        S.SLICE_COLD_USERS: cases.history_events <= cold_user_max_events,
    }


def slice_metrics(ranked: Ranked, cases: Cases, cat: Catalogue, ks: Sequence[int], tail_share: float,
                  cold_user_max_events: int, popularity: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of every slice, coverage and popularity buckets; ``popularity`` = the known events of each
    catalogue row at the stage (default: the catalogue's own popularity)."""
    popularity = cat.popularity if popularity is None else np.asarray(popularity)
    tail = tail_mask(popularity, tail_share)
    out: dict[str, Any] = {}
    for name, m in case_slices(cases, popularity, tail, cold_user_max_events).items():
        if m.any():  # a slice with no case is absent, not zero
            out[name] = rank_metrics(ranked.ranks[m], ks)
    cov: dict[str, float] = {}
    cold = popularity == 0
    for k in ks:
        cov[f"coverage@{k}"] = coverage_at_k(ranked.topk, len(cat), k)
        cov[f"cold_start_share@{k}"] = share_at_k(ranked.topk, cold, k)
        cov[f"long_tail_share@{k}"] = share_at_k(ranked.topk, tail, k)
    out["coverage"] = cov
    if cases.future is not None:
        out["future"] = {f"recall@{k}": set_recall_at_k(ranked.topk, cases.future, k) for k in ks}
    buckets = []
    pop_t = popularity[cases.target_rows]
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
    """A model or baseline ready to score cases: by ``vectors`` (user x item dot products) or, for the
    score-based baselines, by ``scores`` (cases -> score function; ``time_ordered``: the cases must come
    in order of their reference time)."""

    name: str
    vectors: Callable[[Cases], tuple[np.ndarray, np.ndarray]] | None
    cat: Catalogue
    run_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    scores: Callable[[Cases], ScoreFn] | None = None
    time_ordered: bool = False


def make_scorer(cfg: Settings, dataset: str, protocol: str, model: str, split: pd.DataFrame,
                run_dir: Path | None = None, embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                stage: str = S.TEST, model_overrides: dict[str, Any] | None = None) -> Scorer:
    """A baseline (computed from the events known at ``stage``), or a trained run of ``model`` (the latest
    under ``protocol`` unless ``run_dir`` is given). ``model_overrides`` replace inference-time fields of
    the checkpoint's config (e.g. ``{"mix_k": 20}``) without touching the run."""
    if model in BASELINE_KINDS:
        return _baseline_scorer(cfg, dataset, model, split, embeddings, stage)
    if model not in MODEL_KINDS:
        raise ValueError(f"unknown model {model!r}; choose one of {EVAL_KINDS}")
    if run_dir is None:
        run_dir = registry.latest(cfg, dataset, kind=model, protocol=protocol)
        if run_dir is None:
            raise FileNotFoundError(f"no trained {model!r} run for dataset {dataset!r} under protocol {protocol!r}; "
                                    f"run `learn train --dataset {dataset} --protocol {protocol} --model {model}`")
    run_dir = Path(run_dir)
    net, pcfg = load_checkpoint(run_dir)
    if model_overrides:
        pcfg = replace(pcfg, **model_overrides)
        net.config = pcfg
    cat = checkpoint_catalogue(cfg, dataset, run_dir, split, pcfg.uses_content, embeddings)
    item_vecs: list[np.ndarray] = []  # the catalogue's vectors do not depend on the cases: computed once

    def vectors(cases: Cases) -> tuple[np.ndarray, np.ndarray]:
        users, items = model_vectors(net, cat, cases, cfg.evaluate.batch_users, items=next(iter(item_vecs), None))
        item_vecs[:] = [items]
        return users, items

    return Scorer(pcfg.kind, vectors, cat, run_dir, {"fingerprint": cat.fingerprint,
                                                     "config": read_json(run_dir / "config.json")})


def check_scorer(scorer: Scorer, run_dir: str | Path | None, embeddings: Any = None,
                 model_overrides: dict[str, Any] | None = None) -> None:
    """A scorer handed in must be the one the other arguments describe (ValueError otherwise)."""
    if embeddings is not None or model_overrides:
        raise ValueError("give embeddings and model_overrides to make_scorer, not beside a scorer")
    if run_dir is not None and (scorer.run_dir is None or Path(run_dir).resolve() != scorer.run_dir.resolve()):
        raise ValueError(f"the scorer is for {scorer.run_dir}, not for the run {run_dir}")


def _baseline_scorer(cfg: Settings, dataset: str, model: str, split: pd.DataFrame,
                     embeddings: tuple[np.ndarray, np.ndarray] | None, stage: str) -> Scorer:
    known = known_events(split, stage)
    cat = baseline_catalogue(cfg, dataset, split, model == "content_knn", embeddings, known)
    e, info = cfg.evaluate, {"fingerprint": cat.fingerprint}
    if model == "popular":
        return Scorer(model, lambda cases: baselines.popular_vectors(cat.popularity, len(cases)), cat, None, info)
    if model == "content_knn":
        return Scorer(model, lambda cases: baselines.content_knn_vectors(
            cat.content, cases.hist_rows, cases.hist_offsets, cfg.model.max_len), cat, None, info)
    rows = cat.rows(known[S.ITEM_ID].to_numpy())
    if model == "recent_popular":
        times = unix_seconds(known[S.EVENT_TIMESTAMP])
        return Scorer(model, None, cat, None, {**info, "recent_days": e.recent_days},
                      lambda cases: baselines.recent_popular_scores(rows, times, cases.ref_times, len(cat),
                                                                    e.recent_days), time_ordered=True)
    if model == "item_knn":
        sim = baselines.cooccurrence_neighbours(known[S.USER_ID].to_numpy(), rows, len(cat), e.knn_neighbours)
        return Scorer(model, None, cat, None, {**info, "knn_neighbours": e.knn_neighbours},
                      lambda cases: baselines.item_knn_scores(sim, cases.hist_rows, cases.hist_offsets,
                                                              cfg.model.max_len, cat.popularity))
    raise ValueError(f"unknown baseline {model!r}; choose one of {BASELINE_KINDS}")


# ==================================================================================================
# Entry point
# ==================================================================================================
def score_cases(scorer: Scorer, cases: Cases, k_max: int, batch: int = 1024) -> Ranked:
    """Rank the catalogue for ``cases`` with ``scorer``; ranks and top-k come back in the order of ``cases``."""
    if scorer.scores is None:
        user_vecs, item_vecs = scorer.vectors(cases)
        return rank_all(user_vecs, item_vecs, cases, k_max, batch)
    if not scorer.time_ordered:
        return rank_scores(scorer.scores(cases), len(scorer.cat), cases, k_max, batch)
    order = np.argsort(cases.ref_times, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    ordered = cases.subset(order)
    ranked = rank_scores(scorer.scores(ordered), len(scorer.cat), ordered, k_max, batch)
    return Ranked(ranked.ranks[inv], ranked.topk[inv])


def evaluate_cases(scorer: Scorer, cases: Cases, cfg: Settings, popularity: np.ndarray | None = None,
                   ranked: Ranked | None = None) -> dict[str, Any]:
    """Rank the catalogue for ``cases`` with ``scorer`` and compute the metrics of every slice (slices by
    ``popularity``, the known events of each catalogue row; default the scorer catalogue's)."""
    e = cfg.evaluate
    ranked = ranked if ranked is not None else score_cases(scorer, cases, max(e.ks), e.batch_users)
    return slice_metrics(ranked, cases, scorer.cat, e.ks, e.tail_share, e.cold_user_max_events, popularity)


def evaluate_run(cfg: Settings, dataset: str, protocol: str, model: str | None = None,
                 run_dir: str | Path | None = None, stage: str = S.TEST,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None, write_report: bool = True,
                 keep_cases: bool = False, model_overrides: dict[str, Any] | None = None,
                 scorer: Scorer | None = None) -> dict[str, Any]:
    """Evaluate a trained run (latest of ``model`` by default) or a baseline; write metrics.json and a report.

    Returns ``{slice: {"recall@10", "hr@10", "ndcg@10", ..., "mrr", "cases"}, "coverage": {...},
    "popularity_buckets": [...], "meta": {...}}`` (+ ``"future"`` under the temporal protocol). With
    ``keep_cases`` also ``"per_case": {"user_ids", "ranks", "slices": {slice: mask}}`` (numpy arrays, in
    user order, not written to the report) for paired comparisons of models on the same cases.
    ``model`` defaults to ``pipeline.model``. ``scorer``: one :func:`make_scorer` built for the same model,
    run and ``stage`` (the pipeline scores the candidate on test and on the gate sample with one).
    """
    model = model or cfg.pipeline.model
    split = splits.load_split(cfg, dataset, protocol)
    if scorer is not None:
        check_scorer(scorer, run_dir, embeddings, model_overrides)
    else:
        scorer = make_scorer(cfg, dataset, protocol, model, split, Path(run_dir) if run_dir else None, embeddings,
                             stage, model_overrides)
    cases = build_cases(split, scorer.cat, protocol, stage)
    if not len(cases):
        raise ValueError(f"dataset {dataset!r} has no {stage} cases under protocol {protocol!r}")
    n_all = len(cases)
    cases = sample_cases(cases, cfg.evaluate.max_users, cfg.evaluate.seed)
    e = cfg.evaluate
    known_pop = item_popularity(known_events(split, stage), scorer.cat.item_ids)
    ranked = score_cases(scorer, cases, max(e.ks), e.batch_users)
    result = evaluate_cases(scorer, cases, cfg, known_pop, ranked)
    cutoff = stage_cutoff(split, protocol, stage)
    result["meta"] = {
        "dataset": dataset, "protocol": protocol, "stage": stage, "model": scorer.name,
        "run_dir": str(scorer.run_dir) if scorer.run_dir else None, "users": len(cases), "users_available": n_all,
        "items": len(scorer.cat), "ks": list(e.ks), "tail_share": e.tail_share,
        "cold_user_max_events": e.cold_user_max_events, "cutoff": str(cutoff) if cutoff is not None else None,
        "cold_pool": int((known_pop == 0).sum()), "known_events": int(known_pop.sum()),
        "split_kcore": int(split.attrs.get("split_kcore", 0) or 0),
        **{k: v for k, v in scorer.info.items() if k in ("recent_days", "knn_neighbours")},
        **({"model_overrides": model_overrides} if model_overrides else {}),
        "embedding_fingerprint": scorer.info.get("fingerprint"),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    if write_report:
        result["meta"]["report"] = str(write_outputs(cfg, result, scorer))
    if keep_cases:
        tail = tail_mask(known_pop, e.tail_share)
        result["per_case"] = {"user_ids": cases.user_ids, "ranks": ranked.ranks,
                              "slices": case_slices(cases, known_pop, tail, e.cold_user_max_events)}
    return result
