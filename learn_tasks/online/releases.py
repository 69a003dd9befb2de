"""Releases: which model run and which Milvus collection the service serves.

A release is written only once its collection is complete, loaded and checked (``index.release``, called
by ``index.index_catalogue`` after the alias swap, by ``index.rollback`` and by the pipeline's
``load_milvus``); promotion alone (``registry.promote``) releases nothing. The service follows the
release record (``follow.ReleaseFollower``) and never compares the promoted model with the alias, so a
restart between a promotion and the load that follows it serves the previous release as before.

Where records live is shared state (:mod:`learn_tasks.state`, ``state.backend``). Embedded: under
``$LEARN_HOME/serve/<dataset>/`` (``cfg.paths.release`` and ``cfg.paths.release_history``)::

    release.json     the current release, replaced atomically (a reader sees the old one or the new one)
    releases.jsonl   every release, one JSON line each, appended before release.json moves

Production: the tables ``learn_releases`` (every record) and ``learn_release_current`` (the pointer) in
PostgreSQL, both written in one transaction, so every service replica on every host reads the same
current release.

A record::

    {"release_id": 3, "dataset": "synth", "model_version": "<run id>", "collection": "items__synth__<run id>",
     "alias": "items__synth", "rows": 200, "index_recall_at_10": 1.0, "released_at": "<UTC ISO time>",
     "source": "learn_pipeline <run key>", "run_key": "<run key>" | null,
     "previous": {"release_id": 2, "model_version": "...", "collection": "..."} | null}

Pruning old collections (``index.prune``) never drops the released collection nor the previous
release's, so requests still running on the previous release when the service swaps finish there.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from learn_tasks.config import Settings
from learn_tasks.pch import registry
from learn_tasks.state import open_state


def current(cfg: Settings, dataset: str) -> dict[str, Any] | None:
    """The dataset's current release, or None when nothing was released yet."""
    return open_state(cfg).release(dataset)


def history(cfg: Settings, dataset: str) -> list[dict[str, Any]]:
    """Every release of the dataset, oldest first (a torn last line, from a crash mid-append, is skipped)."""
    return open_state(cfg).releases(dataset)


def protected_collections(cfg: Settings, dataset: str) -> set[str]:
    """The released collection and the previous release's: pruning keeps both."""
    rel = current(cfg, dataset)
    if rel is None:
        return set()
    keep = {rel["collection"]}
    if rel.get("previous"):
        keep.add(rel["previous"]["collection"])
    return keep


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two records release the same model run and collection."""
    return a is not None and b is not None and (a.get("model_version"), a.get("collection")) == \
        (b.get("model_version"), b.get("collection"))


def write(cfg: Settings, dataset: str, model_version: str, collection: str, source: str,
          run_key: str | None = None, **facts: Any) -> tuple[dict[str, Any], bool]:
    """Record a release of ``model_version`` served from ``collection``: (record, whether it is new).

    Call it only once the collection is complete, loaded and checked (``index.release`` does). Releasing
    what is already released changes nothing (an idempotent re-run writes no second record). One writer
    at a time per dataset; the history entry is stored with or before the record moves (one transaction
    in PostgreSQL; a synced history line, then an atomic rename, on files), so a crash in between leaves
    the previous release in force.
    """
    wanted = {"dataset": dataset, "model_version": model_version, "collection": collection}

    def build(now: dict[str, Any] | None, last_id: int) -> dict[str, Any] | None:
        if same(now, wanted):
            return None
        return {**wanted, "release_id": last_id + 1, "source": source, "run_key": run_key,
                "released_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "previous": ({k: now[k] for k in ("release_id", "model_version", "collection")} if now else None),
                **facts}

    record, new = open_state(cfg).write_release(dataset, build)
    return cast(dict[str, Any], record), new  # build keeps the current record only when there is one


def model_dir(cfg: Settings, dataset: str, record: dict[str, Any]) -> Path:
    """The model run folder of a release (under this LEARN_HOME, whatever path it was written from; under a
    URL home fetched here first)."""
    found = registry.find_run(cfg, dataset, record["model_version"])
    return found if found is not None else cfg.paths.dataset_models(dataset) / record["model_version"]
