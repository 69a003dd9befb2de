"""Releases: which model run and which Milvus collection the service serves.

A release is written only once its collection is complete, loaded and checked (``index.release``, called
by ``index.index_catalogue`` after the alias swap, by ``index.rollback`` and by the pipeline's
``load_milvus``); promotion alone (``registry.promote``) releases nothing. The service follows the
release record (``follow.ReleaseFollower``) and never compares the promoted model with the alias, so a
restart between a promotion and the load that follows it serves the previous release as before.

Layout under ``$LEARN_HOME/serve/<dataset>/`` (``cfg.paths.release`` and ``cfg.paths.release_history``)::

    release.json     the current release, replaced atomically (a reader sees the old one or the new one)
    releases.jsonl   every release, one JSON line each, appended before release.json moves

A record::

    {"release_id": 3, "dataset": "synth", "model_version": "<run id>", "collection": "items__synth__<run id>",
     "alias": "items__synth", "rows": 200, "index_recall_at_10": 1.0, "released_at": "<UTC ISO time>",
     "source": "learn_pipeline <run key>", "run_key": "<run key>" | null,
     "previous": {"release_id": 2, "model_version": "...", "collection": "..."} | null}

Pruning old collections (``index.prune``) never drops the released collection nor the previous
release's, so requests still running on the previous release when the service swaps finish there.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from learn_tasks.config import Settings
from learn_tasks.pch import registry
from learn_tasks.storage import exclusive, read_json, write_json


def current(cfg: Settings, dataset: str) -> dict[str, Any] | None:
    """The dataset's current release, or None when nothing was released yet."""
    path = cfg.paths.release(dataset)
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def history(cfg: Settings, dataset: str) -> list[dict[str, Any]]:
    """Every release of the dataset, oldest first (a torn last line, from a crash mid-append, is skipped)."""
    path = cfg.paths.release_history(dataset)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


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


@contextmanager
def _locked(cfg: Settings, dataset: str) -> Iterator[None]:
    with exclusive(cfg.paths.release(dataset).with_suffix(".lock")):
        yield


def write(cfg: Settings, dataset: str, model_version: str, collection: str, source: str,
          run_key: str | None = None, **facts: Any) -> tuple[dict[str, Any], bool]:
    """Record a release of ``model_version`` served from ``collection``: (record, whether it is new).

    Call it only once the collection is complete, loaded and checked (``index.release`` does). Releasing
    what is already released changes nothing (an idempotent re-run writes no second record). One writer
    at a time (a lock file beside the record); the history line is appended and synced first, then the
    record is replaced atomically, so a crash in between leaves the previous release in force.
    """
    with _locked(cfg, dataset):
        now = current(cfg, dataset)
        record = {"dataset": dataset, "model_version": model_version, "collection": collection}
        if same(now, record):
            return now, False
        ids = [int(now["release_id"])] if now else []
        ids += [int(r.get("release_id", 0)) for r in history(cfg, dataset)[-1:]]
        last_id = max(ids, default=0)
        record.update({"release_id": last_id + 1, "source": source, "run_key": run_key,
                       "released_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                       "previous": ({k: now[k] for k in ("release_id", "model_version", "collection")}
                                    if now else None), **facts})
        log_path = cfg.paths.release_history(dataset)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        write_json(record, cfg.paths.release(dataset))
        return record, True


def model_dir(cfg: Settings, dataset: str, record: dict[str, Any]) -> Path:
    """The model run folder of a release (under this LEARN_HOME, whatever path it was written from; under a
    URL home fetched here first)."""
    found = registry.find_run(cfg, dataset, record["model_version"])
    return found if found is not None else cfg.paths.dataset_models(dataset) / record["model_version"]
