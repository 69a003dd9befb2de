"""
### learn_monitoring: daily cold-start and long-tail drift check for on-call

One task, **monitor**, calls `learn_tasks.monitoring.monitor.run`: Evidently reports comparing the newest window of
interactions with the training window (share of events on cold-start items, long-tail share among
warm-item events, popularity drift, new-user share, events per user, content-embedding drift of new
items against the catalogue) plus Recall/NDCG@K, coverage and exposure per slice from the newest
evaluation.

* Report: `$LEARN_HOME/reports/monitoring/<date>/<dataset>/report.html` (+ `summary.json`).
* Dashboard: the Evidently workspace `$LEARN_HOME/evidently/`, project `learn monitoring: <dataset>`
  (`learn monitor ui`, then open http://127.0.0.1:8001).
* Alerts: a value beyond its threshold (`cfg.monitor`, see `monitoring/thresholds.md`) fails the task
  without retries when `fail_on_alert` is set (the default); the failure callback logs one line per alert
  naming the slice, the metric, the value and the threshold.

Params: `dataset` (empty = `pipeline.dataset`), `window` (`split`: the temporal split's test window;
`interval`: this run's data interval, for live logs), `fail_on_alert`. Re-running a run replaces its own
report and dashboard points.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

log = logging.getLogger("learn.monitoring")


def _on_failure(context: Any) -> None:
    """Alert callback: the exception of a failed monitor task names every alert (or the error)."""
    ti = context.get("ti") or context.get("task_instance")
    log.error("learn_monitoring.%s failed: %s", getattr(ti, "task_id", "?"), context.get("exception"))


@dag(
    dag_id="learn_monitoring",
    # Daily with a real data interval [day, day + 1) (a plain "@daily" has an empty interval in Airflow 3).
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs of one dataset share its history file and dashboard
    tags=["learn", "monitoring", "evidently"],
    doc_md=__doc__,
    default_args={
        "owner": "learn",
        "retries": 1,  # for transient errors; alerts fail without retry (AirflowFailException)
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": _on_failure,
    },
    params={
        "dataset": Param(None, type=["null", "string"],
                         description="Prepared dataset under $LEARN_HOME/data. Empty = pipeline.dataset."),
        "window": Param("split", enum=["split", "interval"],
                        description="split: the temporal split's test window (events after the cut-off); "
                                    "interval: this run's data interval (live logs)."),
        "fail_on_alert": Param(True, type="boolean",
                               description="Fail the task (no retry) when a threshold is crossed."),
    },
)
def learn_monitoring() -> None:
    @task
    def monitor() -> dict:
        """Evidently reports + workspace snapshot; fails on alerts when fail_on_alert is set."""
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowFailException

        from learn_tasks.monitoring import monitor as mon
        from learn_tasks.config import load_settings

        ctx = get_current_context()
        params, cfg = ctx["params"], load_settings()
        dataset = params.get("dataset") or cfg.pipeline.dataset
        start, end = None, None
        if params.get("window") == "interval":
            start, end = ctx["data_interval_start"].isoformat(), ctx["data_interval_end"].isoformat()
        result = mon.run(cfg, dataset, start, end, run_id=f"learn_monitoring__{ctx['run_id']}",
                         run_date=ctx["data_interval_start"].strftime("%Y-%m-%d"))
        if result["alerts"] and params.get("fail_on_alert", True):
            raise AirflowFailException(str(mon.MonitoringAlert(result["alerts"], result["report"])))
        return {"report": result["report"], "alerts": result["alerts"], "notes": result["notes"]}

    monitor()


learn_monitoring()
