"""Model registry: one folder per training run on the file system, and a promoted pointer per dataset.

Runs live under ``$LEARN_HOME/models/<dataset>/<run_id>/`` (model.safetensors, config.json, items.parquet,
meta.json, train_log.jsonl, metrics.json). A run folder appears only when complete (training builds it
under a temporary name and renames it), so a reader never sees half a checkpoint.

The promoted run of each dataset and every promotion (for audit) are shared state
(:mod:`learn_tasks.state`, ``state.backend``): ``models/<dataset>/PROMOTED`` and ``promotions.jsonl`` on
the embedded stack, PostgreSQL tables (pointer and audit row in one transaction) in production. Only a
complete run is ever promoted, and :func:`promoted` returns None for a run whose folder is gone.

When LEARN_HOME is a URL (:mod:`learn_tasks.artifacts`), a complete run is also published there
(:func:`publish_run`: its files, then its manifest), and a run exists only once published: :func:`runs`
and :func:`latest` list the published runs of every host, and the runs they return (and :func:`find_run`'s,
:func:`promoted`'s) are fetched into the local working directory first.
"""
from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from learn_tasks import artifacts
from learn_tasks.config import Settings
from learn_tasks.state import open_state
from learn_tasks.storage import read_json

log = logging.getLogger(__name__)

META = "meta.json"
_LISTED_META = ("kind", "protocol", "created", "dataset")  # meta.json fields a published run's manifest carries


def dataset_models(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.dataset_models(dataset)


def new_run_dir(cfg: Settings, dataset: str, kind: str) -> Path:
    """A fresh, not yet existing run folder ``<UTC time>-<kind>-<random>``; build it with ``storage.atomic_dir``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    while True:
        path = dataset_models(cfg, dataset) / f"{stamp}-{kind}-{secrets.token_hex(3)}"
        if not path.exists():
            return path


def publish_run(cfg: Settings, run_dir: str | Path) -> None:
    """Publish a complete run folder under a URL home (again after a file was added, e.g. metrics.json);
    nothing for a local home or a folder outside this LEARN_HOME's models."""
    run_dir = Path(run_dir)
    if not artifacts.is_remote(cfg):
        return
    if run_dir.parent.parent.absolute() != cfg.paths.models().absolute():
        log.warning("%s is not a run folder of this LEARN_HOME: not published", run_dir)
        return
    meta = read_json(run_dir / META)
    artifacts.publish(cfg, run_dir, meta={k: meta.get(k) for k in _LISTED_META}, keep_published=True)


def find_run(cfg: Settings, dataset: str, run_id: str) -> Path | None:
    """The complete run folder ``run_id`` of ``dataset`` (fetched here first under a URL home), or None."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        return None
    path = dataset_models(cfg, dataset) / run_id
    if artifacts.is_remote(cfg):
        return path if artifacts.fetch(cfg, path) else None
    return path if (path / META).exists() else None


def _published(cfg: Settings, dataset: str, kind: str | None, protocol: str | None) -> list[tuple[Path, dict]]:
    """Published runs (folder, manifest) matching kind and protocol, oldest first; nothing is fetched."""
    root = dataset_models(cfg, dataset)
    found = []
    for name, manifest in artifacts.published(cfg, root).items():
        meta = manifest.get("meta") or {}
        if (kind is None or meta.get("kind") == kind) and (protocol is None or meta.get("protocol") == protocol):
            found.append((meta.get("created") or "", name, root / name, manifest))
    return [(p, m) for _, _, p, m in sorted(found, key=lambda t: t[:2])]


def runs(cfg: Settings, dataset: str, kind: str | None = None, protocol: str | None = None) -> list[Path]:
    """Complete runs (those with a meta.json), oldest first. Under a URL home: every published run,
    each fetched here (use :func:`latest` or :func:`find_run` when one is enough)."""
    if artifacts.is_remote(cfg):
        return [path for path, manifest in _published(cfg, dataset, kind, protocol)
                if artifacts.fetch(cfg, path, manifest)]
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
    """The newest complete run (of that kind and protocol), or None; under a URL home only it is fetched."""
    if artifacts.is_remote(cfg):
        for path, manifest in reversed(_published(cfg, dataset, kind, protocol)):
            if artifacts.fetch(cfg, path, manifest):
                return path
        return None
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
    return find_run(cfg, dataset, run_id) if run_id else None  # under a URL home: fetched from the store


def promotions(cfg: Settings, dataset: str) -> list[dict[str, Any]]:
    """Every promotion of the dataset, oldest first: ``{"run_id", "at" (UTC ISO time), "reason"}``."""
    return open_state(cfg).promotions(dataset)


def run_kind(run_dir: str | Path) -> str | None:
    """Model kind of a run folder, from its checkpoint config (None when it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError):
        return None
