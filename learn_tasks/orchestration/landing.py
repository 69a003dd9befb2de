"""Landing and validating a batch: the first two stages of every pipeline run.

1. ``land_logs``: new files in ``$LEARN_HOME/incoming/<dataset>/`` (``interactions*``/``events*`` and
   ``items*`` as CSV or Parquet, or the ``interactions/`` and ``items/`` sub-folders) are *moved* into the
   run's landing folder, so each file belongs to exactly one interval; the event log's new records
   (events logged before the interval's end, items added online) are claimed for the run key with the
   log's watermark in one transaction (:meth:`learn_tasks.data.eventlog.EventLog.land`) and written there
   as one Parquet file per stream, so each record lands exactly once and a re-run lands the same ones. A
   full run also snapshots the prepared dataset (the whole history) the first time it lands, so
   re-running it validates the same rows.
2. ``validate_logs``: Great Expectations suites (:mod:`learn_tasks.data.validation`); bad rows are
   quarantined, the task fails over ``validate.max_failed_share``; accepted rows are published into the
   dataset (a full run replaces it, an incremental run merges: events de-duplicated, items upserted). An
   unchanged dataset is not rewritten, so caches keyed on it (splits, features, embeddings) stay valid.
"""
from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import eventlog, public, raw, readers
from learn_tasks.data import validation as V
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.orchestration.runs import FULL, INGEST, PipelineError, RunArgs, dataset_lock, record
from learn_tasks.storage import write_json, write_parquet
from learn_tasks.data import datasets as data


def landing_dir(cfg: Settings, a: RunArgs) -> Path:
    return cfg.paths.landing(a.dataset, a.key)


def ensure_dataset(cfg: Settings, dataset: str) -> dict[str, Any]:
    """Prepare a registered public dataset on first use; any other name must already be prepared."""
    if dataset in public.DATASETS:
        return public.ensure_prepared(cfg, dataset)
    try:
        return data.load_manifest(cfg, dataset)
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc} (registered datasets prepare themselves: {sorted(public.DATASETS)})") from exc


def _incoming_files(cfg: Settings, dataset: str, kinds: Sequence[str]) -> list[Path]:
    src = cfg.paths.incoming(dataset)
    if not src.exists():
        return []
    inter, items = raw.find_batch_files(src)
    return (inter if "interactions" in kinds else []) + (items if "items" in kinds else [])


def _claim_incoming(cfg: Settings, dataset: str, dest: Path, kinds: Sequence[str]) -> list[str]:
    """Move new incoming files of ``kinds`` into ``dest/raw/<kind>/``; each file is claimed once."""
    src = cfg.paths.incoming(dataset)
    if not src.exists():
        return []
    inter, items = raw.find_batch_files(src)
    moved = []
    for kind, files in (("interactions", inter), ("items", items)):
        if kind not in kinds:
            continue
        for f in files:
            rel = f.relative_to(src)
            target = dest / "raw" / kind / "__".join(rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # same name landed before in this interval: keep both
                target = target.with_name(f"{target.stem}.{int(time.time() * 1e6)}{target.suffix}")
            os.replace(f, target)
            moved.append(str(target.relative_to(dest)))
    return moved


LOG_STREAMS = {"interactions": eventlog.EVENTS, "items": eventlog.ITEMS}


def _log_has_new(cfg: Settings, dataset: str, kinds: Sequence[str]) -> bool:
    with open_log(cfg) as log:
        return any(log.high_water(dataset, LOG_STREAMS[k]) > log.watermark(dataset, LOG_STREAMS[k]) for k in kinds)


def _land_log(cfg: Settings, a: RunArgs, dest: Path, kinds: Sequence[str]) -> dict[str, Any]:
    """Claim the log's new records of ``kinds`` for this run key; write each stream's as one Parquet file.

    Events logged at or after the interval's end are left for a later interval. A re-run gets the range
    it claimed before (and rewrites the file if a crash lost it), so nothing lands twice or never.
    """
    out: dict[str, Any] = {}
    with open_log(cfg) as log:
        for kind in kinds:
            stream = LOG_STREAMS[kind]
            got = log.land(a.dataset, stream, a.key, cutoff=a.end if stream == eventlog.EVENTS else None)
            out[stream] = {"after": got.after, "upto": got.upto, "rows": got.rows, "new": got.new}
            if not got.rows:
                continue
            target = dest / "raw" / kind / f"{eventlog.LOG_FILE}-{stream}-{got.after:012d}-{got.upto:012d}.parquet"
            if not target.exists():
                records = log.read(a.dataset, stream, got.after, got.upto)
                write_parquet(eventlog.landed_frame(stream, records, a.dataset), target)
            out[stream]["file"] = str(target.relative_to(dest))
    return out


def landed_files(dest: Path, kind: str) -> list[Path]:
    folder = dest / "raw" / kind
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.exists() else []


def land(cfg: Settings, a: RunArgs, kinds: Sequence[str] = ("interactions", "items")) -> dict[str, Any]:
    """Land the run's batch: claim new incoming files and (full mode) snapshot the prepared dataset."""
    ensure_dataset(cfg, a.dataset)
    dest = landing_dir(cfg, a)
    if (a.mode == INGEST and not (dest / "manifest.json").exists() and not _incoming_files(cfg, a.dataset, kinds)
            and not _log_has_new(cfg, a.dataset, kinds)):
        return {}  # nothing arrived: an empty (falsy) result lets item_ingest skip its other tasks
    dest.mkdir(parents=True, exist_ok=True)
    moved = _claim_incoming(cfg, a.dataset, dest, kinds)
    from_log = _land_log(cfg, a, dest, kinds)
    base = dest / "base"
    if a.mode == FULL and not (base / "manifest.json").exists():
        # Snapshot once: re-running this interval validates exactly the same history.
        src = data.dataset_dir(cfg, a.dataset)
        base.mkdir(exist_ok=True)
        for name in ("interactions.parquet", "items.parquet"):
            if "interactions" in name and "interactions" not in kinds:
                continue
            tmp = base / f".tmp-{name}"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, base / name)
        write_json({"source": str(src), "at": datetime.now(timezone.utc).isoformat()}, base / "manifest.json")
    counts = {}
    for kind in kinds:
        files = landed_files(dest, kind)
        n = sum(_count_rows(p) for p in files)
        if (base / f"{kind}.parquet").exists():
            n += _count_rows(base / f"{kind}.parquet")
        counts[kind] = n
    result = {"dataset": a.dataset, "key": a.key, "mode": a.mode, "landing": str(dest), "new_files": moved,
              "event_log": from_log,
              "files": {k: [p.name for p in landed_files(dest, k)] for k in kinds},
              "base_snapshot": (base / "manifest.json").exists(), "rows": counts}
    write_json(result, dest / "manifest.json")
    return record(cfg, a, "land", result)


def _count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        return max(sum(1 for line in fh if line.strip()) - 1, 0)


def land_logs(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return land(cfg, a, ("interactions", "items"))


def _landed_raw(cfg: Settings, a: RunArgs, kind: str) -> pd.DataFrame | None:
    dest = landing_dir(cfg, a)
    frames = []
    base = dest / "base" / f"{kind}.parquet"
    if base.exists():
        frames.append(raw.read_raw_file(base, kind))
    files = landed_files(dest, kind)
    if files:
        frames.append(raw.read_raw_files(files, kind))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def validate_batch(cfg: Settings, a: RunArgs, kinds: Sequence[str] = ("interactions", "items")) -> dict[str, Any]:
    """Validate the landed batch, quarantine bad rows, publish the accepted ones into the dataset."""
    if not (landing_dir(cfg, a) / "manifest.json").exists():
        raise PipelineError(f"nothing landed for {a.key}: run the land task first")
    inter_raw = _landed_raw(cfg, a, "interactions") if "interactions" in kinds else None
    items_raw = _landed_raw(cfg, a, "items") if "items" in kinds else None
    if inter_raw is None and "interactions" in kinds:
        inter_raw = raw.empty_raw("interactions")
    # A full run's batch carries the whole catalogue; an incremental one is checked against the dataset's.
    # Items added online count as known too: another run (item_ingest) may land and publish them.
    with open_log(cfg) as log:
        online = log.items(a.dataset)[S.ITEM_ID].to_numpy(np.int64)
    catalogue = online if a.mode == FULL else np.union1d(
        data.load_items(cfg, a.dataset)[S.ITEM_ID].to_numpy(np.int64), online)
    try:
        outcome = V.validate_tables(cfg, a.dataset, inter_raw, items_raw, catalogue_ids=catalogue,
                                    start=a.accept_from, end=a.end, key=a.key)
    except V.ValidationFailed as exc:
        record(cfg, a, "validate", {**exc.summary, "published": None})
        raise
    with dataset_lock(cfg, a.dataset):
        published = publish(cfg, a.dataset, outcome.interactions.accepted if outcome.interactions else None,
                            outcome.items.accepted if outcome.items else None, replace=a.mode == FULL)
    summary = {**outcome.summary, "published": published}
    return record(cfg, a, "validate", summary)


def validate_logs(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return validate_batch(cfg, a, ("interactions", "items"))


def publish(cfg: Settings, dataset: str, interactions: pd.DataFrame | None, items: pd.DataFrame | None,
            replace: bool) -> dict[str, Any]:
    """Write accepted rows into the prepared dataset; unchanged tables are not rewritten.

    ``replace`` (full run): the accepted rows *are* the dataset. Otherwise events are merged
    (exact duplicates of stored events are counted as ``already_present``, not added twice) and items
    upserted by id (a changed row replaces the stored one; the encoder re-encodes it by content hash).
    """
    base = data.dataset_dir(cfg, dataset)
    out: dict[str, Any] = {"changed": False}
    cur_items = data.load_items(cfg, dataset)
    new_items = cur_items
    if items is not None:
        batch = raw.typed_items(items)
        if replace:
            new_items = data.canonical_items(batch, readers.Quarantine(), str(base))
            out["items_added"] = int((~new_items[S.ITEM_ID].isin(cur_items[S.ITEM_ID])).sum())
            out["items_removed"] = int((~cur_items[S.ITEM_ID].isin(new_items[S.ITEM_ID])).sum())
        else:
            known = cur_items[S.ITEM_ID].isin(batch[S.ITEM_ID])
            merged = pd.concat([cur_items[~known], batch[list(cur_items.columns.intersection(batch.columns))]],
                               ignore_index=True)
            new_items = data.canonical_items(merged, readers.Quarantine(), str(base))
            out["items_added"] = int((~batch[S.ITEM_ID].isin(cur_items[S.ITEM_ID])).sum())
            old = cur_items.set_index(S.ITEM_ID)
            changed = [i for i in batch[S.ITEM_ID] if i in old.index and not _same_item(old.loc[i], batch, i)]
            out["items_updated"] = len(changed)
        new_items = new_items[list(cur_items.columns)] if set(cur_items.columns) <= set(new_items.columns) else new_items
        if not new_items.reset_index(drop=True).equals(cur_items.reset_index(drop=True)):
            write_parquet(new_items.reset_index(drop=True), base / "items.parquet")
            out["changed"] = True
    out["items"] = len(new_items)

    cur = data.load_interactions(cfg, dataset)
    new = cur
    if interactions is not None:
        batch = raw.typed_interactions(interactions)
        if replace:
            new = data.canonical_interactions(batch)
        else:
            key = [S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]
            present = batch.set_index(key).index.isin(cur.set_index(key).index)
            out["already_present"] = int(present.sum())
            new = data.canonical_interactions(pd.concat([cur, batch[~present]], ignore_index=True))
            out["interactions_added"] = int((~present).sum())
        if not new.equals(cur):
            write_parquet(new, base / "interactions.parquet")
            out["changed"] = True
    out["interactions"] = len(new)
    if out["changed"]:
        shutil.rmtree(base / "splits", ignore_errors=True)  # derived from the old tables: stale now
        manifest = data.load_manifest(cfg, dataset)
        manifest.update({"interactions": len(new), "items": len(new_items), "users": int(new[S.USER_ID].nunique()),
                         "updated": datetime.now(timezone.utc).isoformat()})
        write_json(manifest, base / "manifest.json")
    return out


def _same_item(old_row: pd.Series, batch: pd.DataFrame, item_id: int) -> bool:
    new_row = batch[batch[S.ITEM_ID] == item_id].iloc[-1]
    for col in old_row.index:
        if col in new_row.index:
            a, b = old_row[col], new_row[col]
            if not ((pd.isna(a) and pd.isna(b)) or a == b):
                return False
    return True
