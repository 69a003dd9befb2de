"""Model registry: one folder per training run on the file system, and a promoted pointer per dataset.

Runs live under ``$LEARN_HOME/models/<dataset>/<run_id>/`` (model.safetensors, config.json, items.parquet,
meta.json, train_log.jsonl, metrics.json). A run folder appears only when complete (training builds it
under a temporary name and renames it), so a reader never sees half a checkpoint.

The promoted run of each dataset and every promotion (for audit) are shared state
(:mod:`learn_tasks.state`, ``state.backend``): ``models/<dataset>/PROMOTED`` and ``promotions.jsonl`` on
the embedded stack, PostgreSQL tables (pointer and audit row in one transaction) in production. Only a
complete run is ever promoted, and :func:`promoted` returns None for a run whose folder is gone.
"""
from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from learn_tasks.config import Settings
from learn_tasks.state import open_state
from learn_tasks.storage import read_json

META = "meta.json"


def dataset_models(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.dataset_models(dataset)


def new_run_dir(cfg: Settings, dataset: str, kind: str) -> Path:
    """A fresh, not yet existing run folder ``<UTC time>-<kind>-<random>``; build it with ``storage.atomic_dir``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    while True:
        path = dataset_models(cfg, dataset) / f"{stamp}-{kind}-{secrets.token_hex(3)}"
        if not path.exists():
            return path


def runs(cfg: Settings, dataset: str, kind: str | None = None, protocol: str | None = None) -> list[Path]:
    """Complete runs (those with a meta.json), oldest first."""
    root = dataset_models(cfg, dataset)
    if not root.exists():
        return []
    out = []
    for path in root.iterdir():
        if path.name.startswith(".") or not (path / META).exists():
            continue
        meta = read_json(path / META)
        if kind is not None and meta.get("kind") != kind:
            continue
        if protocol is not None and meta.get("protocol") != protocol:
            continue
        out.append((meta.get("created", ""), path.name, path))
    return [p for _, _, p in sorted(out)]


def latest(cfg: Settings, dataset: str, kind: str | None = None, protocol: str | None = None) -> Path | None:
    found = runs(cfg, dataset, kind, protocol)
    return found[-1] if found else None


def promote(cfg: Settings, dataset: str, run_dir: str | Path, reason: str = "") -> Path:
    """Make ``run_dir`` (which must be a complete run of that dataset) the dataset's promoted run, with an
    audit entry; promoting the run that is already promoted changes nothing (a retried task adds no entry)."""
    run_dir = Path(run_dir)
    root = dataset_models(cfg, dataset)
    if run_dir.parent.resolve() != root.resolve() or not (run_dir / META).exists():
        raise ValueError(f"{run_dir}: not a complete run of dataset {dataset!r} under {root}")
    open_state(cfg).promote(dataset, run_dir.name, reason)
    return run_dir


def promoted(cfg: Settings, dataset: str) -> Path | None:
    """The promoted run folder, or None when nothing was promoted (or the run was removed)."""
    run_id = open_state(cfg).promoted_run(dataset)
    if not run_id:
        return None
    path = dataset_models(cfg, dataset) / run_id
    return path if (path / META).exists() else None


def promotions(cfg: Settings, dataset: str) -> list[dict[str, Any]]:
    """Every promotion of the dataset, oldest first: ``{"run_id", "at" (UTC ISO time), "reason"}``."""
    return open_state(cfg).promotions(dataset)


def run_kind(run_dir: str | Path) -> str | None:
    """Model kind of a run folder, from its checkpoint config (None when it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError):
        return None
