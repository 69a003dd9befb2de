"""Prepared datasets: canonical Parquet tables under ``$LEARN_HOME/data/<name>/`` and their loaders.

:func:`prepare_dataset` reads a source with one of the :mod:`learn_tasks.data.readers`, gives the tables
the schema's columns and dtypes, quarantines duplicate items and events for unknown items, applies the
optional k-core filter and writes ``interactions``, ``items``, ``quarantine`` (and ``users``) Parquet
files plus a ``manifest.json`` whose counts obey ``rows read = rows kept + quarantined (+ k-core removed)``.
Later stages read a prepared dataset with :func:`load_interactions`, :func:`load_items` and
:func:`load_manifest`.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data.readers import FORMATS, READERS, DataError, Quarantine
from learn_tasks.storage import read_json, write_json, write_parquet


# --------------------------------------------------------------------------------------------------
# Canonicalisation and prepare
# --------------------------------------------------------------------------------------------------
def canonical_items(items: pd.DataFrame, q: Quarantine, source: str) -> pd.DataFrame:
    """Schema columns and dtypes; duplicate item ids after the first go to quarantine."""
    items = items.copy()
    for col, dtype in S.ITEM_COLUMNS.items():
        if col not in items:
            items[col] = pd.Series([None] * len(items), dtype=dtype)
    extra = [c for c in items.columns if c not in S.ITEM_COLUMNS]
    items = items[list(S.ITEM_COLUMNS) + extra]
    dup = items[S.ITEM_ID].duplicated(keep="first").to_numpy()
    for i in np.flatnonzero(dup):
        q.add(source, int(i) + 1, S.ITEM_ID, "duplicate item id (first kept)",
              items.iloc[i].to_json(default_handler=str))
    items = items[~dup]
    for col, dtype in S.ITEM_COLUMNS.items():
        items[col] = items[col].astype(dtype)
    for col in S.ITEM_TEXT_FIELDS:  # whitespace-only text counts as missing
        s = items[col].str.strip()
        items[col] = s.where(s != "", None).astype("string")
    return items.sort_values(S.ITEM_ID, kind="stable").reset_index(drop=True)


def canonical_interactions(inter: pd.DataFrame) -> pd.DataFrame:
    inter = inter.copy()
    for col, dtype in S.INTERACTION_COLUMNS.items():
        if col not in inter:
            inter[col] = pd.Series([None] * len(inter), dtype=dtype)
        inter[col] = inter[col].astype(dtype)
    inter = inter[list(S.INTERACTION_COLUMNS)]
    # Stable sort keeps the source's order for events on the same timestamp (Amazon has day granularity).
    return inter.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable").reset_index(drop=True)


def kcore(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core: drop users and items with fewer than ``k`` events until none remain."""
    if k <= 1:
        return inter
    while True:
        u = inter.groupby(S.USER_ID)[S.ITEM_ID].transform("size")
        i = inter.groupby(S.ITEM_ID)[S.USER_ID].transform("size")
        keep = (u >= k) & (i >= k)
        if keep.all():
            return inter
        inter = inter[keep].reset_index(drop=True)


def prepare_dataset(cfg: Settings, fmt: str, input_path: str | Path, name: str) -> dict[str, Any]:
    """Read ``input_path`` in ``fmt`` and write ``$LEARN_HOME/data/<name>/`` (canonical Parquet + quarantine)."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    input_path = Path(input_path)
    if not input_path.exists():
        raise DataError(input_path, "input not found")
    prepared = READERS[fmt](input_path, cfg)
    q = prepared.quarantine
    items = canonical_items(prepared.items, q, str(input_path))
    inter = canonical_interactions(prepared.interactions)
    # An event for an item the catalogue does not have cannot be encoded: quarantine, don't invent items.
    unknown = ~inter[S.ITEM_ID].isin(items[S.ITEM_ID]).to_numpy()
    for i in np.flatnonzero(unknown):
        row = inter.iloc[i]
        q.add(str(input_path), -1, S.ITEM_ID, "event for an item not in the catalogue",
              f"{row[S.USER_ID]},{row[S.ITEM_ID]},{row[S.EVENT_TIMESTAMP]}")
    inter = inter[~unknown].reset_index(drop=True)
    n_before_kcore = len(inter)
    inter = kcore(inter, cfg.data.kcore)
    kept_rows = len(inter) + (n_before_kcore - len(inter)) + len(items)
    share = len(q) / max(prepared.rows_read, 1)
    if share > cfg.data.max_quarantine_share:
        raise DataError(input_path, f"{len(q)} of {prepared.rows_read} rows are malformed "
                        f"({share:.0%} > data.max_quarantine_share); first: {q.rows[0]}")
    out = cfg.paths.dataset(name)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(inter, out / "interactions.parquet")
    write_parquet(items, out / "items.parquet")
    write_parquet(q.frame(), out / "quarantine.parquet")
    if prepared.users is not None:
        write_parquet(prepared.users.astype(S.USER_COLUMNS), out / "users.parquet")
    splits = cfg.paths.dataset_splits(name)
    if splits.exists():  # derived from the old data: stale now
        shutil.rmtree(splits)
    manifest = {
        "name": name, "format": fmt, "input": str(input_path.resolve()),
        "rows_read": prepared.rows_read, "rows_kept": kept_rows - (n_before_kcore - len(inter)),
        "kcore_removed": n_before_kcore - len(inter), "quarantined": len(q),
        "interactions": len(inter), "users": int(inter[S.USER_ID].nunique()), "items": len(items),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    # Conservation: every row read is kept, quarantined or (on request) removed by the k-core filter.
    write_json(manifest, out / "manifest.json")
    return manifest


# --------------------------------------------------------------------------------------------------
# Loading prepared data
# --------------------------------------------------------------------------------------------------
def dataset_dir(cfg: Settings, name: str) -> Path:
    path = cfg.paths.dataset(name)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"dataset {name!r} is not prepared under {path}; run `learn data prepare` first")
    return path


def load_interactions(cfg: Settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_dir(cfg, name) / "interactions.parquet")


def load_items(cfg: Settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_dir(cfg, name) / "items.parquet")


def load_manifest(cfg: Settings, name: str) -> dict[str, Any]:
    return read_json(dataset_dir(cfg, name) / "manifest.json")
