"""Releasing a model to serving (stage 7, ``load_milvus``): the serving model's item tower over the
catalogue into Milvus, behind the dataset's alias, then the release record the service follows
(:mod:`learn_tasks.online.releases`), written only once the collection is complete, loaded and checked.
Also used by ``item_ingest`` to upsert new items.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.online import index, releases
from learn_tasks.online.bundle import ModelBundle
from learn_tasks.orchestration.assets import emit_release
from learn_tasks.orchestration.runs import PIPELINE_DAG, RunArgs, record
from learn_tasks.pch import registry
from learn_tasks.storage import read_json


def load_milvus(cfg: Settings, a: RunArgs, gate: Mapping[str, Any] | None = None,
                outlet_events: Any = None) -> dict[str, Any]:
    """Index the catalogue with the serving model's item tower, then release it.

    A newly promoted model gets a new collection, loaded, checked and then swapped in behind the alias and
    released (``index.index_catalogue``). When the gate kept the current model, its collection is already
    live: rebuilding it would mean serving from a half-filled collection, so the items it lacks (new since
    it was built) or holds with an out-of-date vector (changed text) are upserted into it instead, and it
    is released if it was not (a home indexed before release records existed).

    When this run released a model (now, or in an earlier try of this task), the release asset event is
    emitted through ``outlet_events`` (``learn_monitoring`` and other consumers run on it).
    """
    serving = (gate or {}).get("serving")
    source = f"{PIPELINE_DAG} {a.key}"
    quiet_grpc_noise()
    try:
        live = index.current(cfg, a.dataset)
        live_version = index.collection_version(index.connect(cfg), live) if live is not None else None
        version = Path(serving).name if serving else None
        if serving and live is not None and live_version == version:
            res = refresh_live_collection(cfg, a.dataset, Path(serving), live)
            index.release(cfg, a.dataset, live, source=source, run_key=a.key)  # no new record when released
        elif (serving and live is not None and live_version is not None and sparse_base(Path(serving)) == live_version
              and registry.find_run(cfg, a.dataset, live_version) is not None):
            # A sparse update of the live model: only the rows of items whose vector or statistics changed
            # are rewritten, in the live collection, which then carries (and releases) the new version.
            # (Without the live model's run there is nothing to compare statistics with: a full load, below.)
            res = refresh_live_collection(cfg, a.dataset, Path(serving), live, base=live_version)
            index.release(cfg, a.dataset, live, source=source, run_key=a.key)
        else:
            res = index.index_catalogue(cfg, a.dataset, run_dir=serving, source=source, run_key=a.key)
    finally:
        index.close(cfg)  # Milvus Lite allows one process: let the next task (or the API) open it
    rel = releases.current(cfg, a.dataset) or {}
    released = rel.get("run_key") == a.key
    if released and outlet_events is not None:
        emit_release(outlet_events, rel)
    keep = ("collection", "alias", "rows", "version", "dim", "index_type", "index_recall_at_10", "reused",
            "previous", "dropped", "run_dir", "uri_kind", "upserted", "refreshed", "updated_from")
    out = {k: res.get(k) for k in keep if k in res}
    out.update({"release_id": rel.get("release_id"), "released": released})
    return record(cfg, a, "milvus", out)


def sparse_base(run_dir: Path) -> str | None:
    """The version a sparse update (``pipeline.incremental_update: sparse``) started from, else None."""
    meta = read_json(run_dir / registry.META)
    if meta.get("update") != "sparse" or not meta.get("warm_start"):
        return None
    return Path(meta["warm_start"]).name


def item_rows(cfg: Settings, dataset: str, bundle: Any, ids: np.ndarray):
    """``index.ItemRows`` of catalogue items, with the columns a full load writes (``index.index_catalogue``): the
    model's own popularity and slice flags (items it never saw are cold-start), first_seen from the
    feature table."""
    items = data.load_items(cfg, dataset).set_index(S.ITEM_ID).reindex(ids)
    popularity, cold, tail = index.stat_columns(bundle.stats, ids)
    return index.ItemRows(item_ids=ids, vectors=bundle.item_vectors(ids), popularity=popularity,
                          first_seen=index.first_seen(cfg, dataset, ids), is_cold_start=cold, is_long_tail=tail,
                          titles=items[S.TITLE].tolist() if S.TITLE in items else None)


def indexable(bundle: Any, ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Ids the model can embed; an item whose text the encoder quarantined has no content embedding."""
    usable = np.array([bundle.knows(i) or not bundle.uses_content for i in ids], bool)
    return ids[usable], ids[~usable].tolist()


def refresh_live_collection(cfg: Settings, dataset: str, run_dir: Path, collection: str,
                            base: str | None = None) -> dict[str, Any]:
    """Upsert into the live collection of ``run_dir`` the catalogue items it lacks or holds out of date.

    ``base``: the collection holds ``base``'s rows and ``run_dir`` is a sparse update of it. Rows whose vector
    or model statistics (popularity, slice flags) differ are rewritten, then the collection is marked as
    ``run_dir``'s (:func:`learn_tasks.online.index.adopt`) so releasing it serves the new model."""
    client = index.connect(cfg)
    bundle = ModelBundle.load(cfg, dataset, run_dir)
    ids, skipped = indexable(bundle, data.load_items(cfg, dataset)[S.ITEM_ID].to_numpy(np.int64))
    stored = index.fetch_all(client, collection, vectors_only=True, expected_ids=ids)
    vectors = bundle.item_vectors(ids)
    pos = pd.Series(np.arange(len(stored.item_ids)), index=stored.item_ids).reindex(ids)
    have = pos.notna().to_numpy()
    stale = np.zeros(len(ids), bool)
    if have.any():
        old = stored.vectors[pos[have].astype(np.int64).to_numpy()]
        stale[have] = np.abs(old - vectors[have]).max(axis=1) > 1e-4
    restated = np.zeros(len(ids), bool)
    if base is not None:
        base_dir = registry.find_run(cfg, dataset, base)
        if base_dir is None:
            raise index.IndexStoreError(f"{run_dir.name} updates {base}, whose run is not under {dataset}'s models")
        before = pd.read_parquet(base_dir / "items.parquet").set_index(S.ITEM_ID)
        old_cols, new_cols = index.stat_columns(before, ids), index.stat_columns(bundle.stats, ids)
        restated = np.logical_or.reduce([x != y for x, y in zip(old_cols, new_cols)])
        restated &= have & ~stale
    todo = ids[~have | stale | restated]
    if len(todo):
        index.upsert(cfg, dataset, item_rows(cfg, dataset, bundle, todo), target=collection, client=client)
    rows = int(len(stored.item_ids) + (~have).sum())
    out = {"collection": collection, "alias": index.alias_name(cfg, dataset), "version": run_dir.name,
           "rows": rows, "upserted": int(len(todo)),
           "refreshed": {"new": int((~have).sum()), "changed": int(stale.sum()), "restated": int(restated.sum()),
                         "skipped_no_content": skipped[:50]},
           "reused": True, "run_dir": str(run_dir)}
    if base is not None:
        index.adopt(client, collection, run_dir.name, rows, {"run_dir": str(run_dir), "model_kind": bundle.kind,
                                                             "updated_from": base})
        out["updated_from"] = base
    return out


class _UnimplementedRpcFilter(logging.Filter):
    """Drop grpc's "Method not implemented" tracebacks: pymilvus probes an RPC (AllocTimestamp) that
    Milvus Lite does not offer and carries on; the traceback would read like a failure in a good run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


def quiet_grpc_noise() -> None:
    logger = logging.getLogger("grpc._server")
    if not any(isinstance(f, _UnimplementedRpcFilter) for f in logger.filters):
        logger.addFilter(_UnimplementedRpcFilter())
