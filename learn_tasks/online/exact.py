"""Exact search and recall (pure numpy): the reference a Milvus index's recall is measured against."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None,
               item_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: (rows [Q, k], scores [Q, k]), best first.

    ``exclude[q]`` (item ids, needs ``item_ids``) are left out for query q. Fewer than k candidates
    pad with row -1 and score -inf.
    """
    scores = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T  # [Q, N]
    if exclude is not None:
        pos = {int(i): r for r, i in enumerate(item_ids)} if item_ids is not None else None
        for q, ex in enumerate(exclude):
            rows = [pos[i] for i in ex if i in pos] if pos is not None else list(ex)
            scores[q, rows] = -np.inf
    k_eff = min(k, scores.shape[1])
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff else np.zeros((len(scores), 0), int)
    order = np.take_along_axis(scores, part, 1).argsort(axis=1)[:, ::-1]
    rows = np.take_along_axis(part, order, 1)
    top = np.take_along_axis(scores, rows, 1)
    rows = np.where(np.isfinite(top), rows, -1)
    if k_eff < k:
        rows = np.pad(rows, ((0, 0), (0, k - k_eff)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
    return rows, top


def recall_at_k(found: Sequence[Sequence[int]], exact: Sequence[Sequence[int]], k: int) -> float:
    """Mean over queries of |found[:k] ∩ exact[:k]| / |exact[:k]| (ids; -1 padding ignored)."""
    vals = []
    for f, e in zip(found, exact):
        truth = {int(x) for x in list(e)[:k] if int(x) >= 0}
        if truth:
            vals.append(len({int(x) for x in list(f)[:k]} & truth) / len(truth))
    return float(np.mean(vals)) if vals else 0.0
