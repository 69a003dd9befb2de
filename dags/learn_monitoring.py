"""
### learn_monitoring: cold-start and long-tail drift check for on-call, after each release and daily

Runs when `learn_pipeline` releases a model (the `learn_release` asset, emitted by its `load_milvus`) and
every day at midnight UTC.

One task, **monitor**, calls `learn_tasks.orchestration.stages.monitor_dag_window`: Evidently reports comparing the newest window of
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

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag

from learn_tasks.orchestration.dag_tasks import default_args, release_asset, stage_task

monitor = stage_task("monitor_window", "Evidently reports + workspace snapshot; fails on alerts when "
                                        "fail_on_alert is set.", task_id="monitor")


@dag(
    dag_id="learn_monitoring",
    # On each release, or daily with a real data interval [day, day + 1) (a plain "@daily" has an empty
    # interval in Airflow 3).
    schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
                                 assets=[release_asset()]),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs of one dataset share its history file and dashboard
    tags=["learn", "monitoring", "evidently"],
    doc_md=__doc__,
    # retries for transient errors; alerts fail at once (the stage raises an error retrying cannot fix)
    default_args=default_args(retries=1, retry_delay=timedelta(minutes=1), execution_timeout=timedelta(minutes=30)),
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
    monitor()


learn_monitoring()
