"""Models compared on the same test cases: per-slice means with bootstrap intervals, and paired differences.

The input is, per model, the per-case results of :func:`learn_tasks.evaluation.harness.evaluate_run` with
``keep_cases=True``: one per training seed for a trained model, one for a baseline. Every result must
hold the same cases (the same users in the same order, with the same slice masks); that is what makes
the differences paired.

For each slice, one set of bootstrap replicates (:func:`learn_tasks.evaluation.uncertainty.replicates`)
serves every model and metric: a replicate resamples the slice's cases once for all of them and each
model's seeds on its own, so a model's interval carries test-set and seed-to-seed noise, and the
difference of two models in a replicate is paired. A difference whose interval includes zero is a tie.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from learn_tasks.evaluation.uncertainty import case_values, interval, replicates, verdict


def _check_same_cases(models: dict[str, Sequence[dict[str, Any]]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The shared user ids and slice masks of every per-case result (ValueError naming the first that differs)."""
    ref_name, ref = None, None
    for name, results in models.items():
        if not results:
            raise ValueError(f"model {name!r} has no per-case results")
        for j, r in enumerate(results):
            pc = r["per_case"] if "per_case" in r else r
            if ref is None:
                ref_name, ref = name, pc
                continue
            if not np.array_equal(pc["user_ids"], ref["user_ids"]):
                raise ValueError(f"model {name!r} (result {j}) was evaluated on other cases than {ref_name!r}")
            for s, mask in ref["slices"].items():
                if not np.array_equal(pc["slices"].get(s), mask):
                    raise ValueError(f"model {name!r} (result {j}): slice {s!r} differs from {ref_name!r}'s")
    return np.asarray(ref["user_ids"]), {s: np.asarray(m, bool) for s, m in ref["slices"].items()}


def ranks_of(results: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[S, n]`` target ranks: one row per seed (per result)."""
    return np.stack([np.asarray((r["per_case"] if "per_case" in r else r)["ranks"]) for r in results])


def summarise(models: dict[str, Sequence[dict[str, Any]]], metrics: Sequence[str],
              pairs: Sequence[tuple[str, str]] = (), n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """Per model and slice each metric's mean over seeds and cases with its interval, and paired differences.

    Returns ``{"models": {model: {slice: {metric: mean, f"{metric}_ci": [lo, hi], "cases": n}}},
    "diffs": {f"{a}_vs_{b}": {slice: {metric: {"mean", "lo", "hi", "verdict"}}}}}``; a slice without
    cases is absent.
    """
    _, slices = _check_same_cases(models)
    for a, b in pairs:
        if a not in models or b not in models:
            raise ValueError(f"cannot compare {a!r} with {b!r}: both need per-case results")
    ranks = {name: ranks_of(results) for name, results in models.items()}
    out: dict[str, Any] = {"models": {name: {} for name in models}, "diffs": {f"{a}_vs_{b}": {} for a, b in pairs}}
    for k, (slice_name, mask) in enumerate(slices.items()):
        n = int(mask.sum())
        if not n:
            continue
        columns = [(name, metric) for name in models for metric in metrics]
        values = [case_values(ranks[name][:, mask], metric) for name, metric in columns]
        reps = replicates(values, n_boot, seed + k)
        col = {c: j for j, c in enumerate(columns)}
        for (name, metric), v in zip(columns, values):
            row = out["models"][name].setdefault(slice_name, {"cases": n})
            row[metric] = float(v.mean())
            row[f"{metric}_ci"] = interval(reps[:, col[(name, metric)]], level)
        for a, b in pairs:
            cell = {}
            for metric in metrics:
                ja, jb = col[(a, metric)], col[(b, metric)]
                lo, hi = interval(reps[:, ja] - reps[:, jb], level)
                diff = {"mean": float(values[ja].mean() - values[jb].mean()), "lo": lo, "hi": hi}
                cell[metric] = {**diff, "verdict": verdict(diff)}
            out["diffs"][f"{a}_vs_{b}"][slice_name] = cell
    return out
