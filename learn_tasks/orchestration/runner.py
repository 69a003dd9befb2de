"""``learn run``: ``learn_pipeline`` executed end to end by Airflow's own runner (``dag.test``) on the
embedded stack, in this process, with Airflow's home under ``$LEARN_HOME/airflow``."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from learn_tasks.config import Settings
from learn_tasks.orchestration.airflow_env import DAGS_FOLDER, configure_airflow, ensure_pool
from learn_tasks.orchestration.runs import PIPELINE_DAG, PipelineError, RunArgs, run_dir
from learn_tasks.orchestration.summary import summarize
from learn_tasks.schema import to_utc
from learn_tasks.state import exclusive
from learn_tasks.storage import read_json


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
    d = to_utc(day).floor("D")
    return (d + pd.Timedelta(days=1)).to_pydatetime()


def run_dag(cfg: Settings, dag_id: str, conf: Mapping[str, Any], logical_date: datetime,
            verbose: bool = False, airflow_home: Path | None = None) -> tuple[Any, list[dict[str, Any]], float]:
    """One run of ``dag_id`` through Airflow's own runner (``dag.test``); returns (DagRun, task states, seconds).

    Airflow's home (config, SQLite metadata DB, logs) is ``$LEARN_HOME/airflow`` unless ``airflow_home``
    is given; the tasks run in this process and read their settings from the environment.
    """
    home = cfg.paths.home.resolve()
    lock_path = cfg.paths.locks() / "airflow-run.lock"
    with exclusive(cfg, lock_path, wait=False) as locked:
        if not locked:
            raise PipelineError(f"another `learn run` is using {home} (lock {lock_path})")
        os.environ["LEARN_HOME"] = cfg.remote_home or str(home)  # the tasks' load_settings() must find the same home
        if cfg.remote_home:
            os.environ["LEARN_STORAGE__CACHE_DIR"] = str(home)
        configure_airflow(airflow_home or cfg.paths.airflow(), verbose)
        ensure_pool()
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
        notes = [read_json(p) for p in sorted(failures.glob(f"{PIPELINE_DAG}.*.json"))]
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
