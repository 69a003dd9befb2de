"""The pipeline's stage glue: one function per Airflow task, the promotion gate, the run summary, and
``learn run`` (the ``learn_pipeline`` DAG executed end to end by Airflow's own runner).

Why a module of its own: the DAG files in ``dags/`` stay thin (each task is one call into here), the
same functions are tested without Airflow, and every rule about *order* and *idempotence* lives in one
place instead of being spread over task bodies.

A pipeline run is identified by its dataset, mode and Airflow data interval (:class:`RunArgs`); its
key (``<dataset>_<start>_<end>_<mode>``) names everything the run writes:

``$LEARN_HOME/landing/<dataset>/<key>/``   the landed batch (incoming files moved here, base snapshot)
``$LEARN_HOME/pipeline/<key>/<stage>.json`` what each stage did (also its memo: see below)
``$LEARN_HOME/reports/validation/<key>/``  GX results and Data Docs; ``quarantine/<dataset>/<key>/``
``$LEARN_HOME/reports/pipeline/<key>/``    summary.json + summary.md of the whole run

Stages (``learn_pipeline``):

1. ``land_logs``: new files in ``$LEARN_HOME/incoming/<dataset>/`` (``interactions*``/``events*`` and
   ``items*`` as CSV or Parquet, or the ``interactions/`` and ``items/`` sub-folders) are *moved* into the
   run's landing folder, so each file belongs to exactly one interval. A full run also snapshots the
   prepared dataset (the whole history) the first time it lands, so re-running it validates the same rows.
2. ``validate_logs``: Great Expectations suites (:mod:`learn_tasks.data.validation`); bad rows are quarantined,
   the task fails over ``validate.max_failed_share``; accepted rows are published into the dataset
   (a full run replaces it, an incremental run merges: events de-duplicated, items upserted). An
   unchanged dataset is not rewritten, so caches keyed on it (splits, features, embeddings) stay valid.
3. ``refresh_user_features`` (Feast) and ``encode_new_items`` (CEG, one mapped task per shard) in parallel.
4. ``train_pch``: a full run trains from scratch; an incremental run warm-starts from the promoted model
   with a small budget.
5. ``evaluate``: the candidate on the test split (slices: cold-start, long-tail, head, cold users) and
   on the validation split, where the gate compares it with the promoted model.
6. ``promotion_gate``: promote when the candidate is not worse than the promoted model by more than
   ``pipeline.promotion_margin`` (relative) on ``pipeline.gate_metric``; otherwise keep serving the
   current model and say why.
7. ``load_milvus``: the serving model's item tower over the whole catalogue into a new collection, alias swap.
8. ``monitor``: Evidently drift and slice reports (:mod:`learn_tasks.monitoring.monitor`).
9. ``summarize``: the run summary (what ``learn run`` prints).

Stages (``item_ingest``, mode ``ingest``): ``land_items`` (an empty result when no item file arrived,
which short-circuits the run), ``validate_items`` (item suite; accepted rows upserted into the
catalogue), ``encode_items`` (new or changed items only), ``upsert_items`` (the promoted model's item
tower over the batch's items, upserted into the live Milvus collection: no retrain, no reload).

Idempotence: a stage whose inputs (data fingerprint, embedding version, settings) are unchanged for
the same key returns its recorded result instead of doing the work again, so re-running an interval
trains no second model, promotes nothing twice and leaves the stores as they were; the stages that
are cheap to repeat (Feast, encoding, Milvus) are idempotent by construction in their own modules.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import REPO_ROOT, Settings, load_settings
from learn_tasks.storage import read_json, write_json, write_text

log = logging.getLogger("learn.pipeline")

PIPELINE_DAG = "learn_pipeline"
ITEM_DAG = "item_ingest"
FULL, INCREMENTAL = "full", "incremental"
MODES = (FULL, INCREMENTAL)  # what a person picks for learn_pipeline
KINDS = ("learn_hybrid", "learn", "sasrec")  # candidate model kinds of learn_pipeline
INGEST = "ingest"  # item_ingest runs: items only, merged like an incremental run
DAGS_FOLDER = REPO_ROOT / "dags"


class PipelineError(RuntimeError):
    """A problem retrying cannot fix (bad input, missing dataset): the task fails at once."""


# ==================================================================================================
# Run arguments
# ==================================================================================================
def _utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@dataclass(frozen=True)
class RunArgs:
    """What one pipeline run works on: dataset, mode, data interval [start, end), training overrides."""

    dataset: str
    mode: str
    start: pd.Timestamp
    end: pd.Timestamp
    window_days: int = 1
    epochs: int | None = None
    budget_s: float | None = None
    model: str | None = None  # candidate kind; None = pipeline.model

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, INGEST):
            raise PipelineError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.model is not None and self.model not in KINDS:
            raise PipelineError(f"model must be one of {KINDS}, not {self.model!r}")

    def kind(self, cfg: Settings) -> str:
        """The candidate model kind this run trains."""
        return self.model or cfg.pipeline.model
        if self.window_days < 1:
            raise PipelineError(f"window_days must be >= 1, not {self.window_days}")

    @property
    def key(self) -> str:
        from learn_tasks.data.validation import run_key

        return f"{run_key(self.dataset, self.start, self.end)}_{self.mode}"

    @property
    def accept_from(self) -> pd.Timestamp | None:
        """Earliest event time this run accepts: none for a full run (the whole history)."""
        return None if self.mode == FULL else self.end - pd.Timedelta(days=self.window_days)

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "mode": self.mode, "start": self.start.isoformat(),
                "end": self.end.isoformat(), "window_days": self.window_days, "epochs": self.epochs,
                "budget_s": self.budget_s, "model": self.model, "key": self.key}

    @classmethod
    def from_params(cls, cfg: Settings, params: Mapping[str, Any], start: Any, end: Any) -> "RunArgs":
        """From DAG params (``None`` values fall back to ``pipeline.*`` settings) and the data interval."""
        p = dict(params or {})
        end_ts = _utc(end) if end is not None else pd.Timestamp.now(tz="UTC").floor("D")
        start_ts = _utc(start) if start is not None else end_ts - pd.Timedelta(days=1)
        if start_ts >= end_ts:  # a run without a data interval (asset-triggered): one day up to its time
            start_ts = end_ts - pd.Timedelta(days=1)
        return cls(dataset=p.get("dataset") or cfg.pipeline.dataset, mode=p.get("mode") or cfg.pipeline.mode,
                   start=start_ts, end=end_ts, window_days=int(p.get("window_days") or 1),
                   epochs=_opt(p.get("epochs"), int), budget_s=_opt(p.get("budget_s"), float),
                   model=p.get("model") or None)

    @classmethod
    def from_context(cls, cfg: Settings, context: Mapping[str, Any]) -> "RunArgs":
        start = context.get("data_interval_start")
        end = context.get("data_interval_end")
        if end is None:
            dr = context.get("dag_run")
            end = getattr(dr, "run_after", None) or getattr(dr, "logical_date", None)
        a = cls.from_params(cfg, context.get("params") or {}, start, end)
        dag_id = getattr(context.get("ti"), "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
        return replace(a, mode=INGEST) if dag_id == ITEM_DAG else a


def _opt(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None or value == "" else kind(value)


# ==================================================================================================
# Stage records (the run's memory and its memo)
# ==================================================================================================
def run_dir(cfg: Settings, a: RunArgs) -> Path:
    return cfg.paths.home / "pipeline" / a.key


def record(cfg: Settings, a: RunArgs, stage: str, result: Any, inputs: Mapping[str, Any] | None = None) -> Any:
    write_json({"stage": stage, "inputs": dict(inputs or {}), "result": result,
                "at": datetime.now(timezone.utc).isoformat()}, run_dir(cfg, a) / f"{stage}.json")
    return result


def recorded(cfg: Settings, a: RunArgs, stage: str, inputs: Mapping[str, Any] | None = None) -> Any | None:
    """The recorded result of ``stage`` for this run when its inputs were the same, else None."""
    path = run_dir(cfg, a) / f"{stage}.json"
    if not path.exists():
        return None
    rec = read_json(path)
    if inputs is not None:
        now = json.loads(json.dumps(dict(inputs), default=str))
        before = rec.get("inputs") or {}
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            log.info("%s of %s: inputs changed (%s), running again", stage, a.key, ", ".join(changed))
            return None
    return rec.get("result")


def _changed(cfg: Settings, a: RunArgs, stage: str, inputs: Mapping[str, Any]) -> str:
    """Why a stage runs again: 'first run' or the names of the inputs that changed since the last one."""
    path = run_dir(cfg, a) / f"{stage}.json"
    if not path.exists():
        return "first run for this interval"
    before = read_json(path).get("inputs") or {}
    now = json.loads(json.dumps(dict(inputs), default=str))
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if "settings" in changed:  # name the setting, not the whole section
        sb, sn = before.get("settings") or {}, now.get("settings") or {}
        changed.remove("settings")
        changed += [f"{sec}.{k}" for sec in sorted(set(sb) | set(sn))
                    for k in sorted(set(sb.get(sec) or {}) | set(sn.get(sec) or {}))
                    if (sb.get(sec) or {}).get(k) != (sn.get(sec) or {}).get(k)]
    return "inputs changed: " + ", ".join(changed) if changed else "the previous result is gone"


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        if p.exists():
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def data_fingerprint(cfg: Settings, dataset: str) -> str:
    from learn_tasks.data import datasets as data

    base = data.dataset_dir(cfg, dataset)
    return file_digest(base / "interactions.parquet", base / "items.parquet")


@contextmanager
def dataset_lock(cfg: Settings, dataset: str) -> Iterator[None]:
    """One writer at a time for a dataset's tables (``learn_pipeline`` and ``item_ingest`` both publish)."""
    path = cfg.paths.home / "locks" / f"{dataset}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ==================================================================================================
# 1. land
# ==================================================================================================
def incoming_dir(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.home / "incoming" / dataset


def landing_dir(cfg: Settings, a: RunArgs) -> Path:
    return cfg.paths.home / "landing" / a.dataset / a.key


def ensure_dataset(cfg: Settings, dataset: str) -> dict[str, Any]:
    """Prepare a registered public dataset on first use; any other name must already be prepared."""
    from learn_tasks.data import datasets as data

    if dataset in data.DATASETS:
        return data.ensure_prepared(cfg, dataset)
    try:
        return data.load_manifest(cfg, dataset)
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc} (registered datasets prepare themselves: {sorted(data.DATASETS)})") from exc


def _incoming_files(cfg: Settings, dataset: str, kinds: Sequence[str]) -> list[Path]:
    from learn_tasks.data.validation import find_batch_files

    src = incoming_dir(cfg, dataset)
    if not src.exists():
        return []
    inter, items = find_batch_files(src)
    return (inter if "interactions" in kinds else []) + (items if "items" in kinds else [])


def _claim_incoming(cfg: Settings, dataset: str, dest: Path, kinds: Sequence[str]) -> list[str]:
    """Move new incoming files of ``kinds`` into ``dest/raw/<kind>/``; each file is claimed once."""
    from learn_tasks.data.validation import find_batch_files

    src = incoming_dir(cfg, dataset)
    if not src.exists():
        return []
    inter, items = find_batch_files(src)
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


def _landed_files(dest: Path, kind: str) -> list[Path]:
    folder = dest / "raw" / kind
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.exists() else []


def land(cfg: Settings, a: RunArgs, kinds: Sequence[str] = ("interactions", "items")) -> dict[str, Any]:
    """Land the run's batch: claim new incoming files and (full mode) snapshot the prepared dataset."""
    from learn_tasks.data import datasets as data

    ensure_dataset(cfg, a.dataset)
    dest = landing_dir(cfg, a)
    if a.mode == INGEST and not (dest / "manifest.json").exists() and not _incoming_files(cfg, a.dataset, kinds):
        return {}  # nothing arrived: an empty (falsy) result lets item_ingest skip its other tasks
    dest.mkdir(parents=True, exist_ok=True)
    moved = _claim_incoming(cfg, a.dataset, dest, kinds)
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
        files = _landed_files(dest, kind)
        n = sum(_count_rows(p) for p in files)
        if (base / f"{kind}.parquet").exists():
            n += _count_rows(base / f"{kind}.parquet")
        counts[kind] = n
    result = {"dataset": a.dataset, "key": a.key, "mode": a.mode, "landing": str(dest), "new_files": moved,
              "files": {k: [p.name for p in _landed_files(dest, k)] for k in kinds},
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


# ==================================================================================================
# 2. validate + publish
# ==================================================================================================
def _landed_raw(cfg: Settings, a: RunArgs, kind: str) -> pd.DataFrame | None:
    from learn_tasks.data import validation as V

    dest = landing_dir(cfg, a)
    frames = []
    base = dest / "base" / f"{kind}.parquet"
    if base.exists():
        frames.append(V.read_raw_file(base, kind))
    files = _landed_files(dest, kind)
    if files:
        frames.append(V.read_raw_files(files, kind))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def validate_batch(cfg: Settings, a: RunArgs, kinds: Sequence[str] = ("interactions", "items")) -> dict[str, Any]:
    """Validate the landed batch, quarantine bad rows, publish the accepted ones into the dataset."""
    from learn_tasks.data import datasets as data
    from learn_tasks.data import validation as V

    if not (landing_dir(cfg, a) / "manifest.json").exists():
        raise PipelineError(f"nothing landed for {a.key}: run the land task first")
    inter_raw = _landed_raw(cfg, a, "interactions") if "interactions" in kinds else None
    items_raw = _landed_raw(cfg, a, "items") if "items" in kinds else None
    if inter_raw is None and "interactions" in kinds:
        inter_raw = V.empty_raw("interactions")
    # A full run's batch carries the whole catalogue; an incremental one is checked against the dataset's.
    catalogue = None if a.mode == FULL else data.load_items(cfg, a.dataset)[S.ITEM_ID].to_numpy(np.int64)
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
    from learn_tasks.data import datasets as data
    from learn_tasks.data import validation as V
    from learn_tasks.storage import write_parquet

    base = data.dataset_dir(cfg, dataset)
    out: dict[str, Any] = {"changed": False}
    cur_items = data.load_items(cfg, dataset)
    new_items = cur_items
    if items is not None:
        batch = V.typed_items(items)
        if replace:
            new_items = data.canonical_items(batch, data.Quarantine(), str(base))
            out["items_added"] = int((~new_items[S.ITEM_ID].isin(cur_items[S.ITEM_ID])).sum())
            out["items_removed"] = int((~cur_items[S.ITEM_ID].isin(new_items[S.ITEM_ID])).sum())
        else:
            known = cur_items[S.ITEM_ID].isin(batch[S.ITEM_ID])
            merged = pd.concat([cur_items[~known], batch[list(cur_items.columns.intersection(batch.columns))]],
                               ignore_index=True)
            new_items = data.canonical_items(merged, data.Quarantine(), str(base))
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
        batch = V.typed_interactions(interactions)
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


# ==================================================================================================
# 3. features and encoding
# ==================================================================================================
def refresh_user_features(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Feast: rebuild the feature tables from the published data, apply, materialise (idempotent)."""
    from learn_tasks.online import features

    res = features.run(cfg, a.dataset)
    return record(cfg, a, "features", res)


def plan_encode_shards(cfg: Settings, a: RunArgs) -> list[list[int]]:
    """Shards ``[[i, n], ...]`` for the mapped encode tasks: one per ``encode.shard_items`` items, at most
    ``pipeline.encode_shards`` (parallel workers beyond the cores only add model loads)."""
    from learn_tasks.data import datasets as data

    n_items = len(data.load_items(cfg, a.dataset))
    n = max(1, min(cfg.pipeline.encode_shards, math.ceil(n_items / max(cfg.encode.shard_items, 1))))
    return [[i, n] for i in range(n)]


def encode_new_items(cfg: Settings, a: RunArgs, shard: Sequence[int]) -> dict[str, Any]:
    """CEG for one shard: only items without an up-to-date embedding are encoded."""
    from learn_tasks.ceg import encode

    i, n = int(shard[0]), int(shard[1])
    res = encode.run(cfg, a.dataset, shard=(i, n))
    small = {k: res.get(k) for k in ("encoded", "skipped", "quarantined", "total", "fingerprint", "store",
                                     "complete", "shard", "seconds")}
    return record(cfg, a, f"encode_{i}_of_{n}", small)


def _embedding_version(cfg: Settings, dataset: str) -> str | None:
    path = cfg.paths.embeddings() / dataset / "CURRENT"
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


# ==================================================================================================
# 4-6. train, evaluate, gate
# ==================================================================================================
def _train_inputs(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return {"data": data_fingerprint(cfg, a.dataset), "embeddings": _embedding_version(cfg, a.dataset),
            "mode": a.mode, "epochs": a.epochs, "budget_s": a.budget_s, "model": a.kind(cfg),
            "settings": {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
                         "pipeline": cfg.pipeline.model_dump()}}


def _run_kind(run_dir: Path) -> str | None:
    """Model kind of a training run folder (from its checkpoint config)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError):
        return None


def train_pch(cfg: Settings, a: RunArgs, encoded: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Train the candidate (full: from scratch; incremental: warm start from the promoted model)."""
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    p = cfg.pipeline
    inputs = _train_inputs(cfg, a)
    done = recorded(cfg, a, "train", inputs)
    if done and Path(done["run_dir"]).exists():
        # Same interval, same inputs: the model is already trained (recorded again so the summary says so).
        return record(cfg, a, "train", {**done, "reused": True, "trained_because": None}, inputs)
    why = _changed(cfg, a, "train", inputs)
    kind = a.kind(cfg)
    if _embedding_version(cfg, a.dataset) is None and kind != "sasrec":
        raise PipelineError(f"no complete embedding version for {a.dataset}: the encode tasks did not finish")
    warm = registry.promoted(cfg, a.dataset) if a.mode == INCREMENTAL else None
    if warm is not None and _run_kind(warm) != kind:
        # Another kind serves (pipeline.model was changed): its weights cannot seed this architecture,
        # so this increment trains the new kind from scratch, with the full run's limits.
        log.warning("promoted model %s is a %r, the candidate a %r: training from scratch", warm.name,
                    _run_kind(warm), kind)
        warm = None
    if a.mode == INCREMENTAL and warm is not None:
        epochs = a.epochs if a.epochs is not None else p.incremental_epochs
        budget = a.budget_s if a.budget_s is not None else p.incremental_budget_s
    else:
        epochs = a.epochs if a.epochs is not None else p.epochs
        budget = a.budget_s if a.budget_s is not None else p.budget_s
    res = train.run(cfg, a.dataset, protocol=p.protocol, model=kind, epochs=epochs, budget_s=budget,
                    warm_start=warm)
    keep = ("run_dir", "run_id", "dataset", "protocol", "kind", "stopped", "epochs_run", "best_epoch", "steps",
            "val", "train_seconds", "train_sequences", "items", "embedding_fingerprint", "peak_rss_mb")
    small = {k: res.get(k) for k in keep}
    small.update({"warm_start": str(warm) if warm else None, "epochs_limit": epochs, "budget_s": budget,
                  "encoded": _encode_totals(encoded), "reused": False, "trained_because": why})
    return record(cfg, a, "train", small, inputs)


def _encode_totals(encoded: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    if encoded is None:
        return None
    rows = [encoded[i] for i in range(len(encoded))]  # index access: a mapped XCom list is lazy
    return {"shards": len(rows), **{k: int(sum(r.get(k) or 0 for r in rows))
                                    for k in ("encoded", "skipped", "quarantined", "total")}}


def _eval_cfg(cfg: Settings, users: int) -> Settings:
    return cfg.with_overrides(evaluate={"max_users": int(users)})


def _table(metrics: Mapping[str, Any], ks: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The evaluation table: slice -> cases + recall/ndcg at each k + mrr (small enough for XCom)."""
    out = {}
    for name in S.SLICES:
        m = metrics.get(name)
        if not m:
            continue
        row = {"cases": m.get("cases")}
        for k in ks:
            for metric in ("recall", "ndcg"):
                if f"{metric}@{k}" in m:
                    row[f"{metric}@{k}"] = m[f"{metric}@{k}"]
        if "mrr" in m:
            row["mrr"] = m["mrr"]
        out[name] = row
    return out


def evaluate_candidate(cfg: Settings, a: RunArgs, trained: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate on the test split (report table with slices) and on the validation split (gate)."""
    from learn_tasks.evaluation import evaluate

    p = cfg.pipeline
    # A daily incremental run reports on a user sample: scoring every user every day costs more than
    # the rest of the increment, and the gate has its own fixed sample.
    users = p.eval_users if a.mode == FULL else p.incremental_eval_users
    inputs = {"run_dir": trained["run_dir"], "data": data_fingerprint(cfg, a.dataset),
              "eval_users": users, "gate_users": p.gate_users, "evaluate": cfg.evaluate.model_dump()}
    done = recorded(cfg, a, "evaluate", inputs)
    if done:
        return done
    test = evaluate.run(_eval_cfg(cfg, users), a.dataset, p.protocol, model=a.kind(cfg),
                        run_dir=trained["run_dir"], stage=S.TEST)
    valid = evaluate.run(_eval_cfg(cfg, p.gate_users), a.dataset, p.protocol, model=a.kind(cfg),
                         run_dir=trained["run_dir"], stage=S.VALID)
    res = {"run_dir": trained["run_dir"], "protocol": p.protocol,
           "test": {"users": test["meta"]["users"], "table": _table(test, cfg.evaluate.ks),
                    "coverage": test.get("coverage"), "report": test["meta"].get("report")},
           "valid": {"users": valid["meta"]["users"], p.gate_metric: _metric(valid, p.gate_metric),
                     "report": valid["meta"].get("report")}}
    return record(cfg, a, "evaluate", res, inputs)


def _metric(result: Mapping[str, Any], name: str) -> float | None:
    value = (result.get(S.SLICE_ALL) or {}).get(name)
    return None if value is None else float(value)


def decide(candidate: float | None, current: float | None, margin: float) -> tuple[bool, str]:
    """The gate rule: promote unless the candidate is worse than the current model by more than ``margin``
    (relative). No current model, or one that cannot be scored, means promote."""
    if current is None:
        return True, "no promoted model to compare with"
    if candidate is None:
        return False, "the candidate has no validation score"
    floor = current * (1.0 - margin)
    if candidate >= floor:
        return True, f"candidate {candidate:.4f} >= current {current:.4f} x (1 - {margin:g}) = {floor:.4f}"
    return False, (f"candidate {candidate:.4f} is worse than current {current:.4f} by more than the "
                   f"{margin:.0%} margin (floor {floor:.4f}): keeping the current model")


def promotion_gate(cfg: Settings, a: RunArgs, trained: Mapping[str, Any], evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """Promote the candidate or keep serving the current model, with the reason either way."""
    from learn_tasks.evaluation import evaluate
    from learn_tasks.pch import registry

    p = cfg.pipeline
    cand_dir = Path(trained["run_dir"])
    current = registry.promoted(cfg, a.dataset)
    done = recorded(cfg, a, "gate")
    if done and done.get("candidate") == str(cand_dir) and current is not None \
            and str(current) == done.get("serving"):
        return done  # decided before for this interval and nothing moved since
    cand_score = evaluated["valid"].get(p.gate_metric)
    cur_score = None
    if current is not None and current.resolve() != cand_dir.resolve():
        try:
            cur = evaluate.run(_eval_cfg(cfg, p.gate_users), a.dataset, p.protocol, model=a.kind(cfg),
                               run_dir=current, stage=S.VALID, write_report=False)
            cur_score = _metric(cur, p.gate_metric)
        except Exception as exc:  # noqa: BLE001 - a current model that cannot be scored is replaced, loudly
            log.warning("cannot score the promoted model %s: %s", current, exc)
    promote, reason = decide(cand_score, cur_score, p.promotion_margin)
    if current is not None and current.resolve() == cand_dir.resolve():
        promote, reason = True, "the candidate is already the promoted model"
    elif promote:
        registry.promote(cfg, a.dataset, cand_dir, reason=f"{PIPELINE_DAG} {a.key}: {reason}")
    serving = registry.promoted(cfg, a.dataset)
    res = {"promoted": promote, "reason": reason, "metric": p.gate_metric, "margin": p.promotion_margin,
           "candidate": str(cand_dir), "candidate_score": cand_score,
           "previous": str(current) if current else None, "previous_score": cur_score,
           "serving": str(serving) if serving else None}
    log.info("promotion gate: %s (%s)", "promote" if promote else "keep current", reason)
    return record(cfg, a, "gate", res)


# ==================================================================================================
# 7-8. Milvus and monitoring
# ==================================================================================================
def load_milvus(cfg: Settings, a: RunArgs, gate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Index the catalogue with the serving model's item tower.

    A newly promoted model gets a new collection, loaded, checked and then swapped in behind the alias
    (``index.run``). When the gate kept the current model, its collection is already live: rebuilding
    it would mean serving from a half-filled collection, so the items it lacks (new since it was built)
    or holds with an out-of-date vector (changed text) are upserted into it instead.
    """
    from learn_tasks.online import index

    serving = (gate or {}).get("serving")
    _quiet_grpc_noise()
    try:
        live = index.current(cfg, a.dataset)
        version = Path(serving).name if serving else None
        if serving and live is not None and live == index.collection_name(a.dataset, version):
            res = refresh_live_collection(cfg, a.dataset, Path(serving), live)
        else:
            res = index.run(cfg, a.dataset, run_dir=serving)
    finally:
        index.close(cfg)  # Milvus Lite allows one process: let the next task (or the API) open it
    keep = ("collection", "alias", "rows", "version", "dim", "index_type", "index_recall_at_10", "reused",
            "previous", "dropped", "run_dir", "uri_kind", "upserted", "refreshed")
    return record(cfg, a, "milvus", {k: res.get(k) for k in keep if k in res})


def _item_rows(cfg: Settings, dataset: str, bundle: Any, ids: np.ndarray):
    """``index.ItemRows`` of catalogue items, with the columns a full load writes (``index.run``): the
    model's own popularity and slice flags (items it never saw are cold-start), first_seen from the
    feature table."""
    from learn_tasks.data import datasets as data
    from learn_tasks.online import index

    items = data.load_items(cfg, dataset).set_index(S.ITEM_ID).reindex(ids)
    stats = bundle.stats.reindex(ids)
    return index.ItemRows(item_ids=ids, vectors=bundle.item_vectors(ids),
                          popularity=stats[S.POPULARITY].fillna(0).astype(np.int64).to_numpy(),
                          first_seen=index.first_seen(cfg, dataset, ids),
                          is_cold_start=stats[S.IS_COLD_START].astype("boolean").fillna(True).to_numpy(bool),
                          is_long_tail=stats[S.IS_LONG_TAIL].astype("boolean").fillna(False).to_numpy(bool),
                          titles=items[S.TITLE].tolist() if S.TITLE in items else None)


def _indexable(bundle: Any, ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Ids the model can embed; an item whose text the encoder quarantined has no content embedding."""
    usable = np.array([bundle.knows(i) or not bundle.uses_content for i in ids], bool)
    return ids[usable], ids[~usable].tolist()


def refresh_live_collection(cfg: Settings, dataset: str, run_dir: Path, collection: str) -> dict[str, Any]:
    """Upsert into the live collection of ``run_dir`` the catalogue items it lacks or holds out of date."""
    from learn_tasks.data import datasets as data
    from learn_tasks.online import index
    from learn_tasks.online.service import ModelBundle

    client = index.connect(cfg)
    stored = index.fetch_all(client, collection)
    bundle = ModelBundle.load(cfg, dataset, run_dir)
    ids, skipped = _indexable(bundle, data.load_items(cfg, dataset)[S.ITEM_ID].to_numpy(np.int64))
    vectors = bundle.item_vectors(ids)
    pos = pd.Series(np.arange(len(stored.item_ids)), index=stored.item_ids).reindex(ids)
    have = pos.notna().to_numpy()
    stale = np.zeros(len(ids), bool)
    if have.any():
        old = stored.vectors[pos[have].astype(np.int64).to_numpy()]
        stale[have] = np.abs(old - vectors[have]).max(axis=1) > 1e-4
    todo = ids[~have | stale]
    if len(todo):
        index.upsert(cfg, dataset, _item_rows(cfg, dataset, bundle, todo), target=collection, client=client)
    return {"collection": collection, "alias": index.alias_name(cfg, dataset), "version": run_dir.name,
            "rows": int(len(stored.item_ids) + (~have).sum()), "upserted": int(len(todo)),
            "refreshed": {"new": int((~have).sum()), "changed": int(stale.sum()), "skipped_no_content": skipped[:50]},
            "reused": True, "run_dir": str(run_dir)}


class _UnimplementedRpcFilter(logging.Filter):
    """Drop grpc's "Method not implemented" tracebacks: pymilvus probes an RPC (AllocTimestamp) that
    Milvus Lite does not offer and carries on; the traceback would read like a failure in a good run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


def _quiet_grpc_noise() -> None:
    logger = logging.getLogger("grpc._server")
    if not any(isinstance(f, _UnimplementedRpcFilter) for f in logger.filters):
        logger.addFilter(_UnimplementedRpcFilter())


def run_monitor(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Evidently drift and slice monitoring of this run (``learn_tasks.monitoring.monitor.run``)."""
    from learn_tasks.monitoring import monitor

    # The run key names the monitoring run, so re-running an interval replaces its reports; an
    # incremental run compares its own new events, a full run the temporal split's newest window.
    start, end = (None, None) if a.mode == FULL else (a.accept_from.isoformat(), a.end.isoformat())
    res = monitor.run(cfg, a.dataset, current_start=start, current_end=end, run_id=a.key,
                      run_date=a.start.strftime("%Y-%m-%d"))
    alerts = res.get("alerts") or []
    small = {"report": res.get("report"), "summary": res.get("summary"), "alerts": alerts[:20],
             "alert_count": len(alerts), "workspace": res.get("workspace")}
    record(cfg, a, "monitor", small)
    if alerts and cfg.pipeline.fail_on_alert:
        lines = "; ".join(f"{x.get('slice')}/{x.get('metric')} = {x.get('value')} (threshold {x.get('threshold')})"
                          for x in alerts[:5])
        raise PipelineError(f"monitoring raised {len(alerts)} alert(s): {lines}. Report: {res.get('report')}")
    return small


# ==================================================================================================
# item_ingest: new items live within minutes, without a retrain
# ==================================================================================================
def _ingest(a: RunArgs) -> RunArgs:
    return a if a.mode == INGEST else replace(a, mode=INGEST)


def land_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return land(cfg, _ingest(a), ("items",))


def validate_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    return validate_batch(cfg, _ingest(a), ("items",))


def encode_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    from learn_tasks.ceg import encode

    a = _ingest(a)
    res = encode.run(cfg, a.dataset)
    return record(cfg, a, "encode_items", {k: res.get(k) for k in ("encoded", "skipped", "quarantined", "total",
                                                                  "fingerprint", "complete")})


def upsert_items(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Item tower of the serving model over the items of this batch -> upsert into the live collection."""
    from learn_tasks.online import index
    from learn_tasks.pch import registry

    from learn_tasks.data import validation as V
    from learn_tasks.online.service import ModelBundle

    a = _ingest(a)
    landed = _landed_files(landing_dir(cfg, a), "items")
    quarantine = cfg.paths.quarantine() / a.dataset / a.key / "items.parquet"
    if not landed:
        return record(cfg, a, "upsert", {"upserted": 0, "reason": "no new item files"})
    # The batch's items minus the rows validation quarantined (matched by source file and line).
    raw = V.read_raw_files(landed, "items")
    bad_lines = set()
    if quarantine.exists():
        q = pd.read_parquet(quarantine)
        bad_lines = set(zip(q[S.QUARANTINE_FILE], q[S.QUARANTINE_LINE]))
    ok = [(f, l) not in bad_lines for f, l in zip(raw[V.FILE_COL], raw[V.LINE_COL])]
    ids = np.unique(pd.to_numeric(raw.loc[ok, S.ITEM_ID]).astype("int64").to_numpy())
    serving = registry.promoted(cfg, a.dataset)
    if serving is None or not len(ids):
        return record(cfg, a, "upsert", {"upserted": 0, "reason": "no promoted model yet" if serving is None
                                         else "no valid new items"})
    bundle = ModelBundle.load(cfg, a.dataset, serving)
    ids, skipped = _indexable(bundle, ids)
    rows = _item_rows(cfg, a.dataset, bundle, ids)
    _quiet_grpc_noise()
    try:
        res = index.upsert(cfg, a.dataset, rows)
    finally:
        index.close(cfg)
    return record(cfg, a, "upsert", {**res, "serving": str(serving), "item_ids": ids[:50].tolist(),
                                     "skipped_no_content": skipped[:50]})


# ==================================================================================================
# 9. summary
# ==================================================================================================
def stage_results(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    folder = run_dir(cfg, a)
    out: dict[str, Any] = {}
    if folder.exists():
        for p in sorted(folder.glob("*.json")):
            out[p.stem] = read_json(p).get("result")
    return out


def summarize(cfg: Settings, a: RunArgs, tasks: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``reports/pipeline/<key>/summary.{json,md}`` from the stage records; return the JSON part."""
    st = stage_results(cfg, a)
    encodes = [v for k, v in st.items() if k.startswith("encode_") and k != "encode_items" and v]
    summary = {
        "run": a.as_dict(),
        "tasks": list(tasks or []),
        "validation": _pick(st.get("validate"), ("interactions", "items", "passed", "reports", "data_docs",
                                                 "quarantine", "published")),
        "encoding": {"shards": len(encodes), **{k: sum(int(e.get(k) or 0) for e in encodes)
                                                for k in ("encoded", "skipped", "quarantined", "total")},
                     "fingerprint": encodes[0].get("fingerprint") if encodes else None,
                     "store": encodes[0].get("store") if encodes else None} if encodes else None,
        "features": _pick(st.get("features"), ("store", "rows", "window", "rebuilt", "materialized")),
        "training": st.get("train"),
        "evaluation": st.get("evaluate"),
        "promotion": st.get("gate"),
        "milvus": st.get("milvus"),
        "monitoring": st.get("monitor"),
    }
    out = cfg.paths.reports("pipeline") / a.key
    summary["reports"] = {
        "summary": str(out / "summary.md"),
        "validation": (st.get("validate") or {}).get("reports"),
        "data_docs": (st.get("validate") or {}).get("data_docs"),
        "quarantine": (st.get("validate") or {}).get("quarantine"),
        "evaluation": ((st.get("evaluate") or {}).get("test") or {}).get("report"),
        "monitoring": (st.get("monitor") or {}).get("report"),
    }
    write_json(summary, out / "summary.json")
    write_text(render_summary(summary), out / "summary.md")
    return summary


def _pick(d: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, Any] | None:
    return None if d is None else {k: d.get(k) for k in keys if k in d}


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_summary(s: Mapping[str, Any]) -> str:
    """The summary as Markdown (what ``learn run`` prints)."""
    r = s["run"]
    lines = [f"# {PIPELINE_DAG}: {r['dataset']} ({r['mode']}), interval {r['start']} .. {r['end']}", ""]
    if s.get("tasks"):
        lines += ["## Tasks", "", "| task | state | seconds |", "|---|---|---|"]
        lines += [f"| {t['task']} | {t['state']} | {_f(t.get('seconds'), 1)} |" for t in s["tasks"]]
        lines.append("")
    v = s.get("validation")
    if v:
        lines += ["## Validation (Great Expectations)", ""]
        for table in ("interactions", "items"):
            t = v.get(table)
            if t:
                checks = ", ".join(f"{k} {n}" for k, n in t["by_check"].items()) or "none"
                lines.append(f"- {table}: {t['read']} read = {t['accepted']} accepted + {t['quarantined']} "
                             f"quarantined ({t['failed_share']:.2%}); failed checks: {checks}")
        pub = v.get("published") or {}
        if pub:
            lines.append(f"- published: {pub.get('interactions')} interactions, {pub.get('items')} items"
                         + (" (dataset updated)" if pub.get("changed") else " (dataset unchanged)"))
        lines.append("")
    e = s.get("encoding")
    if e:
        lines += ["## Content embeddings (CEG)", "",
                  f"- {e['encoded']} items encoded, {e['skipped']} already up to date, {e['quarantined']} "
                  f"quarantined, over {e['shards']} shard(s); version {e['fingerprint']}", ""]
    f = s.get("features")
    if f:
        lines += ["## Features (Feast)", "", f"- store {f.get('store')}; rows {f.get('rows')}; "
                  f"materialised: {f.get('materialized')}", ""]
    t = s.get("training")
    if t:
        val = ", ".join(f"{k} {_f(v)}" for k, v in (t.get("val") or {}).items())
        lines += ["## Training (PCH)", "",
                  f"- run {t.get('run_id')} ({t.get('kind')}, {t.get('protocol')}): {t.get('epochs_run')} epoch(s), "
                  f"stopped by {t.get('stopped')}, {_f(t.get('train_seconds'), 1)} s; validation {val or '-'}"
                  + (f"; warm start from {Path(t['warm_start']).name}" if t.get("warm_start") else "")
                  + ("; reused (same inputs)" if t.get("reused") else ""), ""]
    ev = s.get("evaluation")
    if ev:
        table = ev["test"]["table"]
        cols = [c for c in ("recall@10", "ndcg@10", "recall@50", "recall@200", "ndcg@200", "mrr")
                if any(c in row for row in table.values())]
        lines += [f"## Evaluation (test, {ev['protocol']}, {ev['test']['users']} users)", "",
                  "| slice | cases | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, row in table.items():
            lines.append(f"| {name} | {row.get('cases')} | " + " | ".join(_f(row.get(c)) for c in cols) + " |")
        lines.append("")
    g = s.get("promotion")
    if g:
        lines += ["## Promotion gate", "",
                  f"- {'PROMOTED' if g['promoted'] else 'KEPT CURRENT'}: {g['reason']} "
                  f"({g['metric']} on validation)", f"- serving: {g.get('serving')}", ""]
    m = s.get("milvus")
    if m:
        lines += ["## Milvus", "", f"- collection {m.get('collection')} behind alias {m.get('alias')}: "
                  f"{m.get('rows')} items, index recall@10 {_f(m.get('index_recall_at_10'))}", ""]
    mo = s.get("monitoring")
    if mo:
        lines += ["## Monitoring (Evidently)", "", f"- {mo.get('alert_count', 0)} alert(s); report {mo.get('report')}"]
        for al in (mo.get("alerts") or [])[:10]:
            lines.append(f"  - {al.get('slice')}: {al.get('metric')} = {_f(al.get('value'))} "
                         f"(threshold {_f(al.get('threshold'))})")
        lines.append("")
    lines += ["## Reports", ""] + [f"- {k}: {v}" for k, v in s["reports"].items() if v] + [""]
    return "\n".join(lines)


# ==================================================================================================
# Airflow glue: the task wrapper and callbacks the DAG files use
# ==================================================================================================
STAGES: dict[str, Callable[..., Any]] = {
    "land_logs": land_logs, "validate_logs": validate_logs, "refresh_user_features": refresh_user_features,
    "plan_encode_shards": plan_encode_shards, "encode_new_items": encode_new_items, "train_pch": train_pch,
    "evaluate": evaluate_candidate, "promotion_gate": promotion_gate, "load_milvus": load_milvus,
    "monitor": run_monitor, "summarize": summarize,
    "land_items": land_items, "validate_items": validate_items, "encode_items": encode_items,
    "upsert_items": upsert_items,
}


def task_call(stage: str, *args: Any) -> Any:
    """Run ``stage`` for the current Airflow task: settings from the environment, run args from the context.

    Errors retrying cannot fix (bad data, a missing dataset) fail the task at once instead of retrying.
    """
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    from learn_tasks.data.datasets import DataError
    from learn_tasks.data.validation import ValidationFailed

    cfg = load_settings()
    a = RunArgs.from_context(cfg, get_current_context())
    t0 = time.perf_counter()
    _progress(f"{stage} ...")
    try:
        result = STAGES[stage](cfg, a, *args)
    except (ValidationFailed, DataError, PipelineError) as exc:
        raise AirflowFailException(f"{stage}: {exc}") from exc
    _progress(f"{stage} done in {time.perf_counter() - t0:.1f} s")
    return result


def _progress(msg: str) -> None:
    if os.environ.get("LEARN_PROGRESS"):  # set by `learn run`: one line per stage on the terminal
        _stage_logs_to_terminal()
        print(f"[learn run] {datetime.now().strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _stage_logs_to_terminal() -> None:
    """`learn run` keeps Airflow's own logs at WARNING; the stages' INFO lines (encode parts, training
    epochs, gate decision) still reach the terminal through one handler on the ``learn`` logger."""
    for name in ("learn", "learn_tasks"):  # stage loggers are learn.<stage> or the module name
        logger = logging.getLogger(name)
        if any(getattr(h, "_learn_run", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[learn run]   %(name)s: %(message)s"))
        handler._learn_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not twice through Airflow's handlers


def on_task_failure(context: Mapping[str, Any]) -> None:
    """Failure callback: one clear line in the log and a JSON record next to the run's stage records."""
    _failure_note(context, final=True)


def on_task_retry(context: Mapping[str, Any]) -> None:
    _failure_note(context, final=False)


def _failure_note(context: Mapping[str, Any], final: bool) -> None:
    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    dag_id = getattr(ti, "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    try_number = getattr(ti, "try_number", None)
    max_tries = getattr(ti, "max_tries", None)
    try:
        cfg = load_settings()
        a = RunArgs.from_context(cfg, context)
        where = f"dataset {a.dataset} ({a.mode}), interval [{a.start.isoformat()}, {a.end.isoformat()})"
        folder = run_dir(cfg, a) / "failures"
    except Exception:  # noqa: BLE001 - the callback must never hide the original failure
        a, where, folder = None, "unknown run", None
    name = task_id + (f"[{map_index}]" if map_index not in (None, -1) else "")
    what = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception recorded (see the task log)"
    verb = "FAILED" if final else "failed and will be retried"
    msg = (f"{dag_id}.{name} {verb} (try {try_number} of {(max_tries or 0) + 1}) for {where}: {what}")
    if final:
        msg += ". Downstream tasks will not run; fix the cause and clear the task to re-run this interval."
    log.error(msg)
    print(f"[learn run] {msg}", file=sys.stderr, flush=True)
    if folder is not None:
        try:
            write_json({"dag_id": dag_id, "task_id": task_id, "map_index": map_index, "try_number": try_number,
                        "final": final, "message": msg, "exception": what,
                        "at": datetime.now(timezone.utc).isoformat()},
                       folder / f"{name}.json")
        except OSError:
            pass


# ==================================================================================================
# `learn run`: learn_pipeline through Airflow's own runner (dag.test) on the embedded stack
# ==================================================================================================
def airflow_env(home: Path, verbose: bool = False) -> dict[str, str]:
    """Environment for an embedded Airflow: home and SQLite DB in ``home``, the repo's dags/."""
    home = Path(home).resolve()
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO" if verbose else "WARNING",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
    }


def configure_airflow(home: Path, verbose: bool = False) -> Path:
    """Point this process's Airflow at ``home`` and migrate its SQLite DB (created on first use). Idempotent.

    Works before or after ``airflow`` was imported in this process (the ORM is then reconfigured).
    Returns the DB file.
    """
    env = airflow_env(home, verbose)
    os.environ.update(env)
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    db_file = home / "airflow.db"
    fresh = not db_file.exists()
    already = "airflow.settings" in sys.modules
    from airflow import settings

    if already:  # imported earlier with other settings: re-read them
        settings.configure_vars()
        settings.reconfigure_orm()
    from airflow.utils import db

    stamp = home / ".migrated"
    if fresh:
        db.resetdb()  # a new SQLite metadata DB with every table at the current migration
    elif not stamp.exists() or stamp.read_text().strip() != _airflow_version():
        db.initdb()  # an existing DB made by another Airflow version: upgrade it
    write_text(_airflow_version() + "\n", stamp)
    return db_file


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow-core")


def load_dag(dag_id: str):
    """The DAG object from the project's dags/ (import errors are raised with the file named)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise PipelineError("DAG import errors: " + "; ".join(f"{f}: {e}" for f, e in bag.import_errors.items()))
    if dag_id not in bag.dags:
        raise PipelineError(f"DAG {dag_id!r} not found in {DAGS_FOLDER} (found {sorted(bag.dags)})")
    return bag.dags[dag_id]


def logical_date_for(day: str | None) -> datetime:
    """``--date D`` processes the day D: Airflow's manual run at D+1 00:00 UTC has the interval [D, D+1)."""
    if day is None:
        return datetime.now(timezone.utc)
    d = _utc(day).floor("D")
    return (d + pd.Timedelta(days=1)).to_pydatetime()


def run_dag(cfg: Settings, dag_id: str, conf: Mapping[str, Any], logical_date: datetime,
            verbose: bool = False, airflow_home: Path | None = None) -> tuple[Any, list[dict[str, Any]], float]:
    """One run of ``dag_id`` through Airflow's own runner (``dag.test``); returns (DagRun, task states, seconds).

    Airflow's home (config, SQLite metadata DB, logs) is ``$LEARN_HOME/airflow`` unless ``airflow_home``
    is given; the tasks run in this process and read their settings from the environment.
    """
    home = Path(cfg.home).resolve()
    lock_path = home / "locks" / "airflow-run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another `learn run` is using {home} (lock {lock_path})") from None
        os.environ["LEARN_HOME"] = str(home)  # the tasks' load_settings() must find the same home
        configure_airflow(airflow_home or cfg.paths.airflow(), verbose)
        dag = load_dag(dag_id)
        t0 = time.perf_counter()
        dr = dag.test(logical_date=logical_date, run_conf=dict(conf))
        return dr, task_states(dr), time.perf_counter() - t0


def run_pipeline(
    cfg: Settings,
    dataset: str | None = None,
    mode: str | None = None,
    day: str | None = None,
    epochs: int | None = None,
    budget_s: float | None = None,
    window_days: int = 1,
    verbose: bool = False,
    airflow_home: Path | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Run ``learn_pipeline`` once (``day`` = the data interval's day, default yesterday); return the summary
    with ``ok`` (every task succeeded), ``state``, ``run_id``, ``wall_s`` and any failure messages."""
    conf = {"dataset": dataset or cfg.pipeline.dataset, "mode": mode or cfg.pipeline.mode,
            "window_days": window_days, "epochs": epochs, "budget_s": budget_s, "model": model}
    dr, tasks, wall = run_dag(cfg, PIPELINE_DAG, conf, logical_date_for(day), verbose, airflow_home)
    a = RunArgs.from_params(cfg, conf, dr.data_interval_start, dr.data_interval_end)
    ok = bool(tasks) and all(t["state"] == "success" for t in tasks) and str(dr.state).endswith("success")
    summary = summarize(cfg, a, tasks)
    summary.update({"ok": ok, "state": str(dr.state).split(".")[-1], "run_id": dr.run_id, "wall_s": round(wall, 1)})
    failures = run_dir(cfg, a) / "failures"
    if failures.exists():
        notes = [read_json(p) for p in sorted(failures.glob("*.json"))]
        summary["failures"] = [n["message"] for n in notes if n.get("final")]
    return summary


def task_states(dr) -> list[dict[str, Any]]:
    """Every task instance of a DagRun: task (with map index), state, seconds, tries."""
    from airflow.utils.session import create_session

    out = []
    with create_session() as session:
        for ti in sorted(dr.get_task_instances(session=session), key=lambda t: (t.start_date or datetime.max.replace(
                tzinfo=timezone.utc), t.task_id, t.map_index)):
            name = ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else "")
            secs = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else None
            out.append({"task": name, "state": str(ti.state).split(".")[-1] if ti.state else "none",
                        "seconds": secs, "tries": ti.try_number})
    return out
