"""What an Airflow task runs: :func:`task_call` maps a task to its stage function, with settings from
the environment and run arguments from the task's context, and the failure/retry callbacks leave one
clear line per failure (in the log and under the run's ``failures/``).

The DAG files reach this module through :mod:`learn_tasks.orchestration.dag_tasks`, inside the task,
so parsing a DAG file loads none of it.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from learn_tasks.config import load_settings
from learn_tasks.data.readers import DataError
from learn_tasks.data.validation import ValidationFailed
from learn_tasks.orchestration import gate, ingest, landing, release, stages, summary
from learn_tasks.orchestration.runs import PipelineError, RunArgs, run_dir
from learn_tasks.storage import write_json

log = logging.getLogger("learn.pipeline")

STAGES: dict[str, Callable[..., Any]] = {
    # learn_pipeline
    "land_logs": landing.land_logs, "validate_logs": landing.validate_logs,
    "refresh_user_features": stages.refresh_user_features, "plan_encode_shards": stages.plan_encode_shards,
    "encode_new_items": stages.encode_new_items, "train_pch": stages.train_pch,
    "evaluate": stages.evaluate_candidate, "promotion_gate": gate.promotion_gate,
    "load_milvus": release.load_milvus, "monitor": stages.run_monitor, "summarize": summary.summarize_task,
    # item_ingest
    "land_items": ingest.land_items, "validate_items": ingest.validate_items, "encode_items": ingest.encode_items,
    "upsert_items": ingest.upsert_items,
    # learn_monitoring
    "monitor_window": stages.monitor_dag_window,
}


def task_call(stage: str, *args: Any) -> Any:
    """Run ``stage`` for the current Airflow task: settings from the environment, run args from the context.

    Errors retrying cannot fix (bad data, a missing dataset) fail the task at once instead of retrying.
    """
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    cfg = load_settings()
    context = get_current_context()
    a = RunArgs.from_context(cfg, context)
    fn = STAGES[stage]
    # A stage that takes the DAG's own params (learn_monitoring's window, fail_on_alert), the Airflow run id,
    # or the task's outlet events (load_milvus: the release asset) gets them.
    wanted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {k: v for k, v in (("params", dict(context.get("params") or {})),
                                                ("run_id", context.get("run_id")),
                                                ("outlet_events", context.get("outlet_events"))) if k in wanted}
    t0 = time.perf_counter()
    _progress(f"{stage} ...")
    try:
        result = fn(cfg, a, *args, **kwargs)
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
                       folder / f"{dag_id}.{name}.json")  # two DAGs can share a run key
        except OSError:
            pass
