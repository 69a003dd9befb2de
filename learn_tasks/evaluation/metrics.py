"""Ranking metrics: pure functions of 0-based ranks (one target per case) or of top-K lists.

Ranks come from :func:`learn_tasks.evaluation.harness.rank_all` (full catalogue, ties at the middle).
An empty input gives NaN, never 0, so a metric over no case cannot pass for a bad one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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
    """Recall, HR and NDCG at every k, MRR and the number of cases."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    out["cases"] = int(len(ranks))
    return out
