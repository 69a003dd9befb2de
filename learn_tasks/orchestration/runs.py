"""Pipeline runs: what one run works on, and what each of its stages recorded.

A pipeline run is identified by its dataset, mode and Airflow data interval (:class:`RunArgs`); its
key (``<dataset>_<start>_<end>_<mode>``) names everything the run writes:

``$LEARN_HOME/landing/<dataset>/<key>/``   the landed batch (incoming files moved here, base snapshot)
``$LEARN_HOME/pipeline/<key>/<stage>.json`` what each stage did (also its memo: see below)
``$LEARN_HOME/reports/validation/<key>/``  GX results and Data Docs; ``quarantine/<dataset>/<key>/``
``$LEARN_HOME/reports/pipeline/<key>/``    summary.json + summary.md of the whole run

Idempotence: a stage whose inputs (data fingerprint, embedding version, settings) are unchanged for
the same key returns its recorded result instead of doing the work again (:func:`recorded`), so
re-running an interval trains no second model, promotes nothing twice and leaves the stores as they
were; the stages that are cheap to repeat (Feast, encoding, Milvus) are idempotent in their own modules.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd

from learn_tasks.config import MODEL_KINDS, Settings
from learn_tasks.data.validation import run_key
from learn_tasks.schema import to_utc
from learn_tasks.state import exclusive
from learn_tasks.storage import read_json, write_json

log = logging.getLogger("learn.pipeline")

PIPELINE_DAG = "learn_pipeline"
ITEM_DAG = "item_ingest"
MONITORING_DAG = "learn_monitoring"
FULL, INCREMENTAL = "full", "incremental"
MODES = (FULL, INCREMENTAL)  # what a person picks for learn_pipeline
INGEST = "ingest"  # item_ingest runs: items only, merged like an incremental run


class PipelineError(RuntimeError):
    """A problem retrying cannot fix (bad input, missing dataset): the task fails at once."""


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
        if self.model is not None and self.model not in MODEL_KINDS:
            raise PipelineError(f"model must be one of {MODEL_KINDS}, not {self.model!r}")
        if self.window_days < 1:
            raise PipelineError(f"window_days must be >= 1, not {self.window_days}")

    def kind(self, cfg: Settings) -> str:
        """The candidate model kind this run trains."""
        return self.model or cfg.pipeline.model

    @property
    def key(self) -> str:
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
        end_ts = to_utc(end) if end is not None else pd.Timestamp.now(tz="UTC").floor("D")
        start_ts = to_utc(start) if start is not None else end_ts - pd.Timedelta(days=1)
        if start_ts >= end_ts:  # a run without a data interval (asset-triggered): one day up to its time
            start_ts = end_ts - pd.Timedelta(days=1)
        # `learn run` always names its mode; a scheduled or bare trigger gets pipeline.scheduled_mode.
        window_days = _opt(p.get("window_days"), int)
        return cls(dataset=p.get("dataset") or cfg.pipeline.dataset, mode=p.get("mode") or cfg.pipeline.scheduled_mode,
                   start=start_ts, end=end_ts, window_days=1 if window_days is None else window_days,
                   epochs=_opt(p.get("epochs"), int), budget_s=_opt(p.get("budget_s"), float),
                   model=p.get("model") or None)

    @classmethod
    def from_context(cls, cfg: Settings, context: Mapping[str, Any]) -> "RunArgs":
        start = context.get("data_interval_start")
        end = context.get("data_interval_end")
        if end is None:
            dr = context.get("dag_run")
            end = getattr(dr, "run_after", None) or getattr(dr, "logical_date", None)
        params = dict(context.get("params") or {})
        if not params.get("dataset"):  # a run triggered by a release: the released dataset
            params["dataset"] = released_dataset(context)
        a = cls.from_params(cfg, params, start, end)
        dag_id = getattr(context.get("ti"), "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
        return replace(a, mode=INGEST) if dag_id == ITEM_DAG else a


def released_dataset(context: Mapping[str, Any]) -> str | None:
    """The dataset named by the newest asset event that triggered this run (a release's ``extra``), if any."""
    try:
        events = context.get("triggering_asset_events") or {}
        found = [e for evs in events.values() for e in evs if (getattr(e, "extra", None) or {}).get("dataset")]
    except Exception:  # noqa: BLE001 - not an asset-triggered run, or an Airflow without the key
        return None
    if not found:
        return None
    newest = max(found, key=lambda e: str(getattr(e, "timestamp", "")))
    return newest.extra["dataset"]


def _opt(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None or value == "" else kind(value)


# ==================================================================================================
# Stage records (the run's memory and its memo)
# ==================================================================================================
def run_dir(cfg: Settings, a: RunArgs) -> Path:
    return cfg.paths.pipeline_run(a.key)


def record(cfg: Settings, a: RunArgs, stage: str, result: Any, inputs: Mapping[str, Any] | None = None) -> Any:
    write_json({"stage": stage, "inputs": dict(inputs or {}), "result": result,
                "at": datetime.now(timezone.utc).isoformat()}, run_dir(cfg, a) / f"{stage}.json")
    return result


def changed_inputs(before: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[str]:
    """Names of the inputs that differ between a recorded stage and now (compared as JSON)."""
    now = json.loads(json.dumps(dict(inputs), default=str))
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))


def recorded(cfg: Settings, a: RunArgs, stage: str, inputs: Mapping[str, Any] | None = None) -> Any | None:
    """The recorded result of ``stage`` for this run when its inputs were the same, else None."""
    path = run_dir(cfg, a) / f"{stage}.json"
    if not path.exists():
        return None
    rec = read_json(path)
    if inputs is not None:
        changed = changed_inputs(rec.get("inputs") or {}, inputs)
        if changed:
            log.info("%s of %s: inputs changed (%s), running again", stage, a.key, ", ".join(changed))
            return None
    return rec.get("result")


def why_again(cfg: Settings, a: RunArgs, stage: str, inputs: Mapping[str, Any]) -> str:
    """Why a stage runs again: 'first run' or the names of the inputs that changed since the last one."""
    path = run_dir(cfg, a) / f"{stage}.json"
    if not path.exists():
        return "first run for this interval"
    before = read_json(path).get("inputs") or {}
    changed = changed_inputs(before, inputs)
    if "settings" in changed:  # name the setting, not the whole section
        sb, sn = before.get("settings") or {}, json.loads(json.dumps(inputs.get("settings") or {}, default=str))
        changed.remove("settings")
        changed += [f"{sec}.{k}" for sec in sorted(set(sb) | set(sn))
                    for k in sorted(set(sb.get(sec) or {}) | set(sn.get(sec) or {}))
                    if (sb.get(sec) or {}).get(k) != (sn.get(sec) or {}).get(k)]
    return "inputs changed: " + ", ".join(changed) if changed else "the previous result is gone"


def stage_results(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Every stage's recorded result of this run, by stage name."""
    folder = run_dir(cfg, a)
    out: dict[str, Any] = {}
    if folder.exists():
        for p in sorted(folder.glob("*.json")):
            out[p.stem] = read_json(p).get("result")
    return out


# ==================================================================================================
# Fingerprints and locks
# ==================================================================================================
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
    """Digest of the prepared dataset's two tables: a stage's input when it reads them."""
    base = cfg.paths.dataset(dataset)
    return file_digest(base / "interactions.parquet", base / "items.parquet")


@contextmanager
def dataset_lock(cfg: Settings, dataset: str) -> Iterator[None]:
    """One writer at a time for a dataset's tables (``learn_pipeline`` and ``item_ingest`` both publish), on
    whichever host their tasks run (``state.backend``)."""
    with exclusive(cfg, cfg.paths.locks() / f"{dataset}.lock"):
        yield
