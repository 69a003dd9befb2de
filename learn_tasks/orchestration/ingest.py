"""``item_ingest``: new items recommendable within minutes, without a retrain.

``land_items`` (an empty result when no item file arrived, which short-circuits the run),
``validate_items`` (item suite; accepted rows upserted into the catalogue), ``encode_items`` (new or
changed items only), ``upsert_items`` (the released model's item tower over the batch's items, upserted
into the released Milvus collection: no retrain, no reload; in the Milvus writers' pool).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.ceg import encode
from learn_tasks.config import Settings
from learn_tasks.data import raw
from learn_tasks.online import index, releases
from learn_tasks.online.bundle import ModelBundle
from learn_tasks.orchestration.landing import land, landed_files, landing_dir, validate_batch
from learn_tasks.orchestration.release import indexable, item_rows, quiet_grpc_noise
from learn_tasks.orchestration.runs import INGEST, RunArgs, record
from learn_tasks.pch import registry


def _ingest(a: RunArgs) -> RunArgs:
    return a if a.mode == INGEST else replace(a, mode=INGEST)


def land_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return land(cfg, _ingest(a), ("items",))


def validate_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return validate_batch(cfg, _ingest(a), ("items",))


def encode_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Content embeddings for the catalogue items that have none up to date (the batch's new items)."""
    a = _ingest(a)
    res = encode.encode_catalogue(cfg, a.dataset)
    return record(cfg, a, "encode_items", {k: res.get(k) for k in ("encoded", "skipped", "quarantined", "total",
                                                                  "fingerprint", "complete")})


def upsert_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Item tower of the released model over the items of this batch -> upsert into the released collection.

    The release, not the promoted model: between a promotion and the load that releases it, the live
    collection still holds the previous model's vectors, and the service still serves that model.
    """
    a = _ingest(a)
    landed = landed_files(landing_dir(cfg, a), "items")
    quarantine = cfg.paths.quarantine_batch(a.dataset, a.key) / "items.parquet"  # this batch's bad item rows
    if not landed:
        return record(cfg, a, "upsert", {"upserted": 0, "reason": "no new item files"})
    # The batch's items minus the rows validation quarantined (matched by source file and line).
    raw_items = raw.read_raw_files(landed, "items")
    bad_lines = set()
    if quarantine.exists():
        q = pd.read_parquet(quarantine)
        bad_lines = set(zip(q[S.QUARANTINE_FILE], q[S.QUARANTINE_LINE]))
    ok = [(f, l) not in bad_lines for f, l in zip(raw_items[raw.FILE_COL], raw_items[raw.LINE_COL])]
    ids = np.unique(pd.to_numeric(raw_items.loc[ok, S.ITEM_ID]).astype("int64").to_numpy())
    rel = releases.current(cfg, a.dataset)
    # Without a release record (a home indexed before they existed): the promoted model and the live alias.
    serving = releases.model_dir(cfg, a.dataset, rel) if rel else registry.promoted(cfg, a.dataset)
    if serving is None or not len(ids):
        return record(cfg, a, "upsert", {"upserted": 0, "reason": "no released model yet" if serving is None
                                         else "no valid new items"})
    bundle = ModelBundle.load(cfg, a.dataset, serving)
    ids, skipped = indexable(bundle, ids)
    rows = item_rows(cfg, a.dataset, bundle, ids)
    quiet_grpc_noise()
    try:
        res = index.upsert(cfg, a.dataset, rows, target=rel["collection"] if rel else None)
    finally:
        index.close(cfg)
    return record(cfg, a, "upsert", {**res, "serving": str(serving), "item_ids": ids[:50].tolist(),
                                     "skipped_no_content": skipped[:50]})
