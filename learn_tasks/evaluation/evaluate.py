"""Evaluation: full-ranking metrics (pure functions), item and user slices, the evaluation harness and reports.

Every model, neural or baseline, is reduced to two matrices: user vectors (one per test case) and item
vectors (one per catalogue item). The score of an item is their exact dot product, computed against the
*whole* catalogue; items already in the user's history are excluded (set to -inf) except the target
itself, so a repeated purchase stays rankable. Ties are broken at the middle (the expected rank under a
random order), so a model that gives many items the same score -- popularity on cold items, one shared
unknown-item embedding -- gains nothing from ties.

Protocols (from :func:`learn_tasks.data.datasets.load_split`):

* ``loo``       test: history = every event but the last, target = the last; valid: history = train events,
                target = the second-to-last event;
* ``temporal``  test: every user with events on both sides of the cut-off; history = all events before it,
                target = the first event after it (``future`` also reports Recall@K against every item the
                user has after the cut-off); valid: the same with the validation cut-off.

Slices of test cases: ``cold_start`` (the target has 0 training interactions), ``long_tail`` (the target is
among the least popular warm items that together hold ``tail_share`` of training interactions), ``head``
(the other warm items), ``cold_users`` (users with <= ``cold_user_max_events`` training events). A slice
with no case is absent from the output, not zero.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.storage import atomic_dir, read_json, write_json

log = logging.getLogger("learn.evaluate")

NEURAL_KINDS = ("learn", "learn_hybrid", "sasrec")
BASELINES = ("popular", "content_knn")
MODELS = NEURAL_KINDS + BASELINES
POPULARITY_BUCKETS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


# ==================================================================================================
# Metrics: pure functions of 0-based ranks (one target per case) or top-K lists
# ==================================================================================================
def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose single target ranks in the top k (equal to HR@k with one target)."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    return recall_at_k(ranks, k)


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean of 1/log2(rank+2) over cases whose target ranks in the top k (0 otherwise); ideal DCG is 1."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return float("nan")
    gain = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gain.mean())


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank over the full ranking (no cut-off)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(1.0 / (ranks + 1.0))) if len(ranks) else float("nan")


def set_recall_at_k(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Mean over cases of |top-k ∩ targets| / |targets| (several relevant items per case)."""
    vals = [len(np.intersect1d(row[:k], t)) / len(t) for row, t in zip(topk, targets) if len(t)]
    return float(np.mean(vals)) if vals else float("nan")


def coverage_at_k(topk: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one user's top k."""
    return float(len(np.unique(np.asarray(topk)[:, :k])) / n_items) if n_items else float("nan")


def share_at_k(topk: np.ndarray, member: np.ndarray, k: int) -> float:
    """Share of recommended slots (top k of every case) filled by items with ``member[item]`` True."""
    topk = np.asarray(topk)[:, :k]
    return float(np.asarray(member)[topk].mean()) if topk.size else float("nan")


def rank_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    out["cases"] = int(len(ranks))
    return out


# ==================================================================================================
# Item slices
# ==================================================================================================
def item_popularity(train_interactions: pd.DataFrame, all_item_ids: np.ndarray) -> np.ndarray:
    """Training interaction count of every item in ``all_item_ids`` (sorted ascending), int64."""
    counts = train_interactions[S.ITEM_ID].value_counts()
    return counts.reindex(np.asarray(all_item_ids), fill_value=0).to_numpy(np.int64)


def tail_mask(popularity: np.ndarray, tail_share: float) -> np.ndarray:
    """Long-tail members: the least popular warm items that together hold ``tail_share`` of interactions.

    Warm items are taken in ascending popularity (ties in the given order) while the running total
    stays within ``tail_share`` of all training interactions.
    """
    popularity = np.asarray(popularity)
    warm = np.flatnonzero(popularity > 0)
    order = warm[np.argsort(popularity[warm], kind="stable")]
    cum = np.cumsum(popularity[order])
    mask = np.zeros(len(popularity), dtype=bool)
    mask[order[cum <= tail_share * popularity.sum()]] = True
    return mask


def item_slices(train_interactions: pd.DataFrame, all_item_ids: np.ndarray, tail_share: float) -> dict[str, np.ndarray]:
    """Item ids of each slice: ``cold_start`` (0 training interactions), ``long_tail`` and ``head``."""
    ids = np.sort(np.asarray(all_item_ids, dtype=np.int64))
    pop = item_popularity(train_interactions, ids)
    tail = tail_mask(pop, tail_share)
    return {S.SLICE_COLD_START: ids[pop == 0], S.SLICE_LONG_TAIL: ids[tail], S.SLICE_HEAD: ids[(pop > 0) & ~tail]}


# ==================================================================================================
# Catalogue: item ids, frozen content embeddings, ID vocab and popularity, aligned by row
# ==================================================================================================
@dataclass
class Catalogue:
    item_ids: np.ndarray  # [N] int64, sorted ascending; a "row" below is a position in this array
    content: np.ndarray | None  # [N, d_in] float32, or None for ID-only models
    item_idx: np.ndarray  # [N] int64 row of the model's ID vocab, 0 = unknown (unseen in training)
    popularity: np.ndarray  # [N] int64 training interactions
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, len(self.item_ids) - 1)
        bad = self.item_ids[pos] != item_ids
        if bad.any():
            missing = np.unique(item_ids[bad])
            raise ValueError(f"{len(missing)} item id(s) not in the catalogue, e.g. {missing[:10].tolist()}")
        return pos

    def vocab_frame(self, tail_share: float) -> pd.DataFrame:
        """The ``items.parquet`` a checkpoint carries: item_id -> item_idx, popularity and slice flags."""
        tail = tail_mask(self.popularity, tail_share)
        return pd.DataFrame({S.ITEM_ID: self.item_ids, "item_idx": self.item_idx, S.POPULARITY: self.popularity,
                             S.IS_COLD_START: self.popularity == 0, S.IS_LONG_TAIL: tail})


def current_fingerprint(cfg: Settings, dataset: str) -> str | None:
    path = cfg.paths.embeddings() / dataset / "CURRENT"
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def load_content(cfg: Settings, dataset: str, item_ids: np.ndarray,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                 fingerprint: str | None = None, encode_missing: bool = False) -> tuple[np.ndarray, str | None]:
    """Content embeddings for ``item_ids`` (in that order) from the CEG store, or from ``embeddings``.

    Items missing from the store raise a clear error listing them (or, with ``encode_missing``, are
    encoded first by the CEG stage).
    """
    if embeddings is None:
        from learn_tasks.ceg import encode

        try:
            emb_ids, emb = encode.load_embeddings(cfg, dataset, fingerprint)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no content embeddings for dataset {dataset!r} ({exc}); "
                                    f"run `learn encode --dataset {dataset}` first") from exc
        fingerprint = fingerprint or current_fingerprint(cfg, dataset)
    else:
        emb_ids, emb = embeddings
    emb_ids = np.asarray(emb_ids, dtype=np.int64)
    order = np.argsort(emb_ids, kind="stable")
    emb_ids, emb = emb_ids[order], np.asarray(emb, dtype=np.float32)[order]
    pos = np.clip(np.searchsorted(emb_ids, item_ids), 0, max(len(emb_ids) - 1, 0))
    missing = item_ids[(emb_ids[pos] != item_ids) if len(emb_ids) else np.ones(len(item_ids), bool)]
    if len(missing):
        if encode_missing and embeddings is None:
            from learn_tasks.ceg import encode

            log.info("encoding %d item(s) missing from the embedding store", len(missing))
            encode.run(cfg, dataset)
            return load_content(cfg, dataset, item_ids, None, None, encode_missing=False)
        raise ValueError(
            f"{len(missing)} item(s) of dataset {dataset!r} have no content embedding "
            f"(fingerprint {fingerprint}), e.g. item_id {missing[:20].tolist()}; run `learn encode --dataset "
            f"{dataset}` (or set train.encode_missing=true)")
    return emb[pos], fingerprint


def catalogue_item_ids(cfg: Settings, dataset: str, interactions: pd.DataFrame) -> np.ndarray:
    from learn_tasks.data import datasets as data

    items = data.load_items(cfg, dataset)
    return np.union1d(items[S.ITEM_ID].to_numpy(np.int64), interactions[S.ITEM_ID].to_numpy(np.int64))


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
    import torch

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
    import torch

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


def checkpoint_catalogue(cfg: Settings, dataset: str, run_dir: Path, split: pd.DataFrame, needs_content: bool) -> Catalogue:
    """The current catalogue with the checkpoint's ID vocab (items it never saw get 0 = unknown)."""
    train = split[split[S.SPLIT] == S.TRAIN]
    ids = catalogue_item_ids(cfg, dataset, split)
    vocab = pd.read_parquet(run_dir / "items.parquet")
    idx = pd.Series(vocab["item_idx"].to_numpy(), index=vocab[S.ITEM_ID].to_numpy()).reindex(ids, fill_value=0)
    meta = read_json(run_dir / "meta.json")
    content, fp = (None, None)
    if needs_content:
        fp = meta.get("embedding_fingerprint")
        content, fp = load_content(cfg, dataset, ids, fingerprint=_usable_fingerprint(cfg, dataset, fp))
    return Catalogue(ids, content, idx.to_numpy(np.int64), item_popularity(train, ids), fp)


def _usable_fingerprint(cfg: Settings, dataset: str, fp: str | None) -> str | None:
    """The checkpoint's own embedding version when the store still has it, else the current one."""
    if fp and (cfg.paths.embeddings() / dataset / fp).exists():
        return fp
    if fp:
        log.warning("embedding version %s of the checkpoint is gone; using the current one", fp)
    return None


def make_scorer(cfg: Settings, dataset: str, protocol: str, model: str, split: pd.DataFrame,
                run_dir: Path | None = None, embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> Scorer:
    from learn_tasks.evaluation import baselines

    if model in BASELINES:
        train = split[split[S.SPLIT] == S.TRAIN]
        ids = catalogue_item_ids(cfg, dataset, split)
        content, fp = (None, None)
        if model == "content_knn":
            content, fp = load_content(cfg, dataset, ids, embeddings)
        cat = Catalogue(ids, content, np.zeros(len(ids), np.int64), item_popularity(train, ids), fp)
        if model == "popular":
            fn = lambda cases: baselines.popular_vectors(cat.popularity, len(cases))  # noqa: E731
        else:
            fn = lambda cases: baselines.content_knn_vectors(  # noqa: E731
                cat.content, cases.hist_rows, cases.hist_offsets, cfg.model.max_len)
        return Scorer(model, fn, cat, None, {"fingerprint": fp})
    if model not in NEURAL_KINDS:
        raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    from learn_tasks.pch import model as M
    from learn_tasks.pch import registry

    if run_dir is None:
        run_dir = registry.latest(cfg, dataset, kind=model, protocol=protocol)
        if run_dir is None:
            raise FileNotFoundError(f"no trained {model!r} run for dataset {dataset!r} under protocol {protocol!r}; "
                                    f"run `learn train --dataset {dataset} --protocol {protocol} --model {model}`")
    run_dir = Path(run_dir)
    net, pcfg = M.load_checkpoint(run_dir)
    if embeddings is not None and pcfg.uses_content:
        train = split[split[S.SPLIT] == S.TRAIN]
        ids = catalogue_item_ids(cfg, dataset, split)
        vocab = pd.read_parquet(run_dir / "items.parquet")
        idx = pd.Series(vocab["item_idx"].to_numpy(), index=vocab[S.ITEM_ID].to_numpy()).reindex(ids, fill_value=0)
        content, _ = load_content(cfg, dataset, ids, embeddings)
        cat = Catalogue(ids, content, idx.to_numpy(np.int64), item_popularity(train, ids))
    else:
        cat = checkpoint_catalogue(cfg, dataset, run_dir, split, pcfg.uses_content)
    return Scorer(pcfg.kind, lambda cases: model_vectors(net, cat, cases, cfg.evaluate.batch_users), cat, run_dir,
                  {"fingerprint": cat.fingerprint, "config": read_json(run_dir / "config.json")})


# ==================================================================================================
# Entry point
# ==================================================================================================
def evaluate_cases(scorer: Scorer, cases: Cases, cfg: Settings) -> dict[str, Any]:
    e = cfg.evaluate
    user_vecs, item_vecs = scorer.vectors(cases)
    ranked = rank_all(user_vecs, item_vecs, cases, max(e.ks), e.batch_users)
    return slice_metrics(ranked, cases, scorer.cat, e.ks, e.tail_share, e.cold_user_max_events)


def run(cfg: Settings, dataset: str, protocol: str, model: str = "learn", run_dir: str | Path | None = None,
        stage: str = S.TEST, embeddings: tuple[np.ndarray, np.ndarray] | None = None,
        write_report: bool = True) -> dict[str, Any]:
    """Evaluate a trained run (latest of ``model`` by default) or a baseline; write metrics.json and a report.

    Returns ``{slice: {"recall@10", "hr@10", "ndcg@10", ..., "mrr", "cases"}, "coverage": {...},
    "popularity_buckets": [...], "meta": {...}}`` (+ ``"future"`` under the temporal protocol).
    """
    from learn_tasks.data import datasets as data

    split = data.load_split(cfg, dataset, protocol)
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


# ==================================================================================================
# Outputs: metrics.json beside the run, and metrics.json + report.md + an SVG plot under reports/eval
# ==================================================================================================
def write_outputs(cfg: Settings, result: dict[str, Any], scorer: Scorer) -> Path:
    meta = result["meta"]
    name = (f"{scorer.run_dir.name}-{meta['stage']}" if scorer.run_dir is not None
            else f"{meta['model']}-{meta['protocol']}-{meta['stage']}")
    out = cfg.paths.reports("eval") / meta["dataset"] / name
    if scorer.run_dir is not None and meta["stage"] == S.TEST:
        write_json(result, scorer.run_dir / "metrics.json")
    with atomic_dir(out) as tmp:
        write_json(result, tmp / "metrics.json")
        (tmp / "recall_by_popularity.svg").write_text(popularity_svg(result), encoding="utf-8")
        (tmp / "report.md").write_text(markdown_report(result), encoding="utf-8")
    return out


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.4f}" if isinstance(x, float) else str(x))


def markdown_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    ks = meta["ks"]
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr", "cases"]
    lines = [f"# Evaluation: {meta['model']} on {meta['dataset']} ({meta['protocol']}, {meta['stage']})", "",
             f"Full ranking over {meta['items']} items, {meta['users']} users "
             f"(of {meta['users_available']}); history items excluded. Run: `{meta['run_dir']}`.", "",
             "| slice | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in S.SLICES:
        if s in result:
            lines.append(f"| {s} | " + " | ".join(_fmt(result[s].get(c)) for c in cols) + " |")
    lines += ["", "| K | coverage | cold-start share | long-tail share |", "|---|---|---|---|"]
    cov = result["coverage"]
    for k in ks:
        lines.append(f"| {k} | {_fmt(cov[f'coverage@{k}'])} | {_fmt(cov[f'cold_start_share@{k}'])} | "
                     f"{_fmt(cov[f'long_tail_share@{k}'])} |")
    if "future" in result:
        lines += ["", "Recall@K against every item after the cut-off: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in result["future"].items())]
    lines += ["", "## Recall@K by training popularity of the target", "",
              "![Recall@K by popularity bucket](recall_by_popularity.svg)", "",
              "| popularity | cases | " + " | ".join(f"recall@{k}" for k in ks) + " |", "|---" * (len(ks) + 2) + "|"]
    for b in result["popularity_buckets"]:
        lines.append(f"| {b['bucket']} | {b['cases']} | " + " | ".join(_fmt(b[f'recall@{k}']) for k in ks) + " |")
    return "\n".join(lines) + "\n"


def popularity_svg(result: dict[str, Any], width: int = 640, height: int = 360) -> str:
    """A grouped bar chart of Recall@K per popularity bucket, as a self-contained SVG."""
    ks = result["meta"]["ks"]
    buckets = result["popularity_buckets"]
    colours = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee"]
    left, bottom, top, right = 50, 50, 30, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    vals = [b[f"recall@{k}"] or 0.0 for b in buckets for k in ks]
    ymax = max(max(vals, default=0.0), 1e-9)
    ymax = math.ceil(ymax * 10) / 10 if ymax > 0.1 else ymax * 1.1
    group_w = plot_w / max(len(buckets), 1)
    bar_w = group_w * 0.8 / len(ks)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">Recall@K by training popularity of the target '
             f'({result["meta"]["model"]}, {result["meta"]["protocol"]})</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>']
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{ymax * i / 4:.3f}</text>')
    for g, b in enumerate(buckets):
        x0 = left + g * group_w + group_w * 0.1
        for j, k in enumerate(ks):
            v = b[f"recall@{k}"] or 0.0
            h = plot_h * v / ymax
            parts.append(f'<rect x="{x0 + j * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{colours[j % len(colours)]}"><title>{b["bucket"]}: recall@{k} '
                         f'{v:.4f} ({b["cases"]} cases)</title></rect>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
                     f'{b["bucket"]}</text>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 28}" text-anchor="middle" '
                     f'fill="#666">n={b["cases"]}</text>')
    for j, k in enumerate(ks):
        parts.append(f'<rect x="{left + 10 + j * 90}" y="{height - 14}" width="10" height="10" fill="{colours[j % len(colours)]}"/>'
                     f'<text x="{left + 24 + j * 90}" y="{height - 5}">recall@{k}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
