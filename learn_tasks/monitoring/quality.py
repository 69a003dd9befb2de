"""Recommendation behaviour per slice, read from the newest offline evaluation of the tracked model kind.

The tracked kind is ``monitor.eval_model``; when that is None it is the kind of the model the service
serves (the dataset's current release, :func:`learn_tasks.online.releases.current`), else of the promoted
model, else ``pipeline.model`` (what the pipeline trains); ``""`` tracks any kind. Evaluations are
``$LEARN_HOME/reports/eval/<dataset>/*/metrics.json`` (under a URL home, the published ones, fetched here);
only test-stage ones count, and when the released run
has one of its own, that one is read (not a newer evaluation of another run of the same kind).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from learn_tasks import artifacts
from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.monitoring.rules import finite
from learn_tasks.online import releases
from learn_tasks.pch import registry
from learn_tasks.storage import read_json

log = logging.getLogger("learn.monitor")

_QUALITY = re.compile(r"^(recall|ndcg|hr)@\d+$|^mrr$")


def served_run(cfg: Settings, dataset: str) -> Path | None:
    """The model run folder of the dataset's current release (None before the first release)."""
    rel = releases.current(cfg, dataset)
    return releases.model_dir(cfg, dataset, rel) if rel else None


def tracked_model(cfg: Settings, dataset: str) -> str:
    """The model kind whose evaluation monitoring tracks (see the module docstring)."""
    if cfg.monitor.eval_model is not None:
        return cfg.monitor.eval_model
    served = served_run(cfg, dataset)
    kind = registry.run_kind(served) if served is not None else None
    if kind:
        return kind
    run_dir = registry.promoted(cfg, dataset)
    if run_dir is not None:
        kind = registry.run_kind(run_dir)
        if kind:
            return kind
    return cfg.pipeline.model


def latest_eval(cfg: Settings, dataset: str) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The newest test-stage ``metrics.json`` of the tracked model kind for ``dataset`` (or a note why none)."""
    root = cfg.paths.eval_reports(dataset)
    artifacts.fetch_children(cfg, root)  # a URL home: the evaluations every host published
    want = tracked_model(cfg, dataset)
    found: list[tuple[str, Path, dict]] = []
    for path in sorted(root.glob("*/metrics.json")) if root.is_dir() else []:
        try:
            m = read_json(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable evaluation %s: %s", path, exc)
            continue
        if not isinstance(m, dict):
            log.warning("skipping evaluation %s: not a JSON object", path)
            continue
        meta = m.get("meta") or {}
        if meta.get("stage", S.TEST) != S.TEST or (want and meta.get("model") != want):
            continue
        found.append((str(meta.get("created", "")), path, m))
    if not found:
        which = f"model {want!r}" if want else "any model"
        return None, None, (f"no evaluation of {which} for dataset {dataset!r} under {root}; recommendation "
                            f"metrics are left out (run `learn evaluate --dataset {dataset}`)")
    served = served_run(cfg, dataset) if cfg.monitor.eval_model is None else None
    own = [f for f in found if served is not None and _run_name(f[2]) == served.name]
    _, path, m = max(own or found, key=lambda t: (t[0], t[1].stat().st_mtime))
    return path, m, None


def _run_name(metrics: dict[str, Any]) -> str | None:
    run_dir = (metrics.get("meta") or {}).get("run_dir")
    return Path(run_dir).name if run_dir else None


def eval_values(metrics: dict[str, Any], k: int) -> dict[str, float]:
    """Flatten an evaluation's metrics into ``<slice>.<metric>`` values.

    Reads ``{slice: {"recall@K", "ndcg@K", "hr@K", "mrr"}}``, ``coverage: {"coverage@K",
    "cold_start_share@K", "long_tail_share@K"}`` (exposure share of those items in the top-K) and, when
    present, ``scores: {slice: {"p10"|"p50"|"p90"|"mean": score}}`` (scores of the recommended items).
    """
    out: dict[str, float] = {}
    for slc in S.SLICES:
        for name, v in (metrics.get(slc) or {}).items():
            if _QUALITY.match(name) and finite(v):
                out[f"{slc}.{name}"] = float(v)
    cov = metrics.get("coverage") or {}
    for name, v in cov.items():
        if not finite(v):
            continue
        m = re.match(r"^(coverage|cold_start_share|long_tail_share)@(\d+)$", name)
        if not m:
            continue
        kind, kk = m.groups()
        if kind == "coverage":
            out[f"{S.SLICE_ALL}.coverage@{kk}"] = float(v)
        else:
            out[f"{kind.removesuffix('_share')}.exposure@{kk}"] = float(v)
    for slc, stats in (metrics.get("scores") or {}).items():
        if slc in S.SLICES and isinstance(stats, dict):
            for name, v in stats.items():
                if finite(v):
                    out[f"{slc}.score_{name}"] = float(v)
    return out
