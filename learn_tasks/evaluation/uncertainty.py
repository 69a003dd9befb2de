"""Uncertainty of offline metrics: per-case values, bootstrap intervals and paired differences.

Every metric of the harness is a mean over test cases of a per-case value (Recall@K: 1 when the target
ranks in the top K; NDCG@K: 1 / log2(rank + 2) inside the top K). A model trained with several seeds has
one value per seed and case, ``[S, n]``; its point estimate is the mean over seeds and cases.

The bootstrap resamples **cases** (with replacement, n of them) and, for a trained model, **seeds** (S of
them) in every replicate, so an interval carries both the sampling noise of the test set and the
seed-to-seed noise of training. A difference between two models is **paired**: both are scored on the
same resampled cases in each replicate (their seeds are resampled independently), which removes the
case-difficulty noise they share. Intervals are percentile intervals of ``n_boot`` replicates. A
difference whose interval includes zero is a tie.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CHUNK = 200  # replicates per matrix product (bounds memory: CHUNK x n weights)


def case_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-case values of ``metric`` ("recall@K", "hr@K" or "ndcg@K") from 0-based target ranks."""
    name, k = metric.split("@")
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < int(k)
    if name in ("recall", "hr"):
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    raise ValueError(f"no per-case form for metric {metric!r}")


def _as_seeds(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[None, :] if v.ndim == 1 else v


def replicates(models: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of each model's mean: ``[n_boot, len(models)]``.

    ``models[m]`` holds per-case values ``[n]`` or ``[S_m, n]`` (one row per training seed), all on the
    same n cases. Each replicate draws one multiset of cases shared by every model (paired) and, per model,
    S_m seeds with replacement.
    """
    mats = [_as_seeds(v) for v in models]
    n = mats[0].shape[1]
    if any(m.shape[1] != n for m in mats):
        raise ValueError("every model must be scored on the same cases")
    if n == 0:
        return np.full((n_boot, len(mats)), np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(mats)))
    for lo in range(0, n_boot, CHUNK):
        b = min(CHUNK, n_boot - lo)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # [b, n] case weights
        for j, m in enumerate(mats):
            per_seed = counts @ m.T / n  # [b, S]: each seed's mean on the resampled cases
            picks = rng.integers(0, m.shape[0], size=(b, m.shape[0]))
            out[lo:lo + b, j] = np.take_along_axis(per_seed, picks, axis=1).mean(1)
    return out


def interval(reps: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval ``[lo, hi]`` of bootstrap replicates."""
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(reps, dtype=np.float64), [100 * a, 100 * (1 - a)])
    return [float(lo), float(hi)]


def mean_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, list[float]]:
    """Point estimate (mean over seeds and cases) and its bootstrap interval."""
    v = _as_seeds(values)
    return float(v.mean()) if v.size else float("nan"), interval(replicates([v], n_boot, seed)[:, 0], level)


def paired_difference(a, b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of ``a`` minus mean of ``b`` on the same cases, with its paired bootstrap interval:
    ``{"mean", "lo", "hi"}``."""
    a, b = _as_seeds(a), _as_seeds(b)
    reps = replicates([a, b], n_boot, seed)
    lo, hi = interval(reps[:, 0] - reps[:, 1], level)
    return {"mean": float(a.mean() - b.mean()), "lo": lo, "hi": hi}


def verdict(diff: dict[str, float]) -> str:
    """"better" / "worse" when the interval excludes zero, else "tie"."""
    if diff["lo"] > 0:
        return "better"
    if diff["hi"] < 0:
        return "worse"
    return "tie"


def paired_ratio(a, b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of ``a`` divided by mean of ``b`` on the same cases, with its paired bootstrap interval."""
    a, b = _as_seeds(a), _as_seeds(b)
    reps = replicates([a, b], n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = reps[:, 0] / reps[:, 1]
    lo, hi = interval(ratio[np.isfinite(ratio)], level) if np.isfinite(ratio).any() else [float("nan")] * 2
    return {"mean": float(a.mean() / b.mean()) if b.mean() else float("nan"), "lo": lo, "hi": hi}
