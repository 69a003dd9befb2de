"""
### item_ingest: new catalogue items searchable within minutes, without a retrain

Runs every 15 minutes, and at once when the item-log asset `learn_new_items` gets an event (UI: Assets
-> learn_new_items -> create event; REST: `POST /api/v2/assets/events`).

```
land_items -> validate_items -> encode_items -> upsert_items
```

* **land_items** moves new item files (`items*.csv|parquet` or `items/`) from
  `$LEARN_HOME/incoming/<dataset>/` into this run's landing folder; with none, the run stops here
  (the rest is skipped, nothing is written).
* **validate_items** runs the item suite of Great Expectations (ids, duplicates, title present and not
  over-long); bad rows are quarantined, good ones are upserted into the dataset's catalogue.
* **encode_items** computes content embeddings for items without an up-to-date one (the frozen LLM).
* **upsert_items** runs the released model's item tower over the new items and upserts them into the
  released Milvus collection, so a cold-start item is recommendable before the next training run. It
  runs in the `learn_milvus` pool (one slot) with `learn_pipeline`'s `load_milvus`.

Idempotent per run: a re-run finds the same landed files, the same embeddings and upserts the same rows.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from learn_tasks.orchestration.dag_tasks import MILVUS_POOL, default_args, item_log_asset, stage_task

land_items = stage_task("land_items", "Move new item files into this run's landing folder; no new file = skip the "
                                      "rest of the run.", decorator=task.short_circuit)
validate_items = stage_task("validate_items", "Great Expectations item suite; quarantine bad rows; upsert good "
                                              "rows into the catalogue.")
encode_items = stage_task("encode_items", "Content embeddings for items that have no up-to-date one.")
upsert_items = stage_task("upsert_items", "Item tower of the released model over the new items -> upsert into the "
                                          "released Milvus collection.", pool=MILVUS_POOL)


@dag(
    dag_id="item_ingest",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("*/15 * * * *", timezone="UTC"), assets=[item_log_asset()]),
    # Static and early: replays of historical logs (the Amazon sample spans 1996-2014) run with their own
    # dates, and a logical date before start_date would create no tasks. catchup=False keeps it harmless.
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["learn", "recommender", "items", "cold-start"],
    doc_md=__doc__,
    default_args=default_args(retries=2, retry_delay=timedelta(seconds=20), execution_timeout=timedelta(minutes=20)),
    params={
        "dataset": Param(None, type=["null", "string"],
                         description="Dataset whose catalogue receives the items; empty = pipeline.dataset."),
    },
)
def item_ingest() -> None:
    land_items() >> validate_items() >> encode_items() >> upsert_items()


item_ingest()
