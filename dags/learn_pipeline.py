"""
### learn_pipeline: the LEARN recommender's main job

Daily (one run per UTC day, for the day before) and on demand from the UI with parameters.

```
land_logs -> validate_logs -+-> refresh_user_features -------------------------------+-> train_pch
                            +-> plan_encode_shards -> encode_new_items[shard 0..n] -+
train_pch -> evaluate -> promotion_gate -> load_milvus -> monitor -> summarize
```

* **land_logs** moves new files from `$LEARN_HOME/incoming/<dataset>/` into the run's landing folder
  (a *full* run also snapshots the whole prepared history).
* **validate_logs** runs the Great Expectations suites; bad rows go to `$LEARN_HOME/quarantine/`, the task
  fails when more than `validate.max_failed_share` of a table is bad; accepted rows are published.
  Report and Data Docs: `$LEARN_HOME/reports/validation/<run key>/`.
* **refresh_user_features** (Feast) and **encode_new_items** (frozen LLM, one mapped task per shard, only
  items without an up-to-date embedding) run in parallel.
* **train_pch** trains the preference model: from scratch (`full`) or warm-started from the promoted
  model with a small budget (`incremental`).
* **evaluate** scores the candidate on the test split (cold-start, long-tail, head, cold-user slices) and
  on the validation split; **promotion_gate** promotes it unless it is worse than the current model by
  more than `pipeline.promotion_margin`, and says why either way.
* **load_milvus** loads the serving model's item embeddings into a new collection, checks it, swaps the
  alias and writes the release record the service follows (it swaps to the new model without a restart);
  when it released, it emits the `learn_release` asset (`learn_monitoring` runs on it). It runs in the
  `learn_milvus` pool (one slot), as does `item_ingest`'s `upsert_items`: one writer per collection.
* **monitor** runs the Evidently drift and slice reports; **summarize** writes
  `$LEARN_HOME/reports/pipeline/<run key>/summary.md`.

Every task is idempotent for its data interval: re-running a day trains no second model and leaves the
feature store, the embedding store and Milvus as they are. Each task is one call into
`learn_tasks.orchestration` (built by `stage_task`); heavy libraries load inside the tasks, so parsing
this file is fast.
A failed task writes a one-line reason to its log and to `$LEARN_HOME/pipeline/<run key>/failures/`.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag

from learn_tasks.config import MODEL_KINDS
from learn_tasks.orchestration.dag_tasks import MILVUS_POOL, default_args, release_alias, stage_task

land_logs = stage_task("land_logs", "Move new log and item files into this interval's landing folder (full: "
                                    "snapshot the history).")
validate_logs = stage_task("validate_logs", "Great Expectations on logs and items; quarantine bad rows; publish "
                                            "accepted rows.")
refresh_user_features = stage_task("refresh_user_features", "Feast: rebuild user and item feature tables, apply, "
                                                            "materialise to the online store.")
plan_encode_shards = stage_task("plan_encode_shards", "Split the catalogue into encode shards ([i, n] pairs) for "
                                                      "the mapped encode task.")
encode_new_items = stage_task("encode_new_items", "Content embeddings (frozen LLM) for one shard's items that have "
                                                  "none up to date.",
                              inputs=["shard"], max_active_tis_per_dagrun=2)  # 2 cores: more parallel encoders only contend
train_pch = stage_task("train_pch", "Train the PCH towers: from scratch (full) or warm-started from the promoted "
                                    "model (incremental).",
                       inputs=["encoded"])
evaluate = stage_task("evaluate", "Full-ranking metrics of the candidate: test slices for the report, validation "
                                  "for the gate.",
                      inputs=["trained"])
promotion_gate = stage_task("promotion_gate", "Promote the candidate unless it is worse than the serving model by "
                                              "more than the margin.",
                            inputs=["trained", "evaluated"])
load_milvus = stage_task("load_milvus", "Item tower of the serving model over the catalogue -> new Milvus "
                                        "collection, checked, alias swap, release (emits learn_release).",
                         inputs=["gate"], outlets=[release_alias()], pool=MILVUS_POOL)
monitor = stage_task("monitor", "Evidently drift and cold-start / long-tail slice monitoring.")
summarize = stage_task("summarize", "Write the run summary (validation, encoding, training, evaluation, promotion, "
                                    "Milvus, reports).")


@dag(
    dag_id="learn_pipeline",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    # Static and early: replays of historical logs (the Amazon sample spans 1996-2014) run with their own
    # dates, and a logical date before start_date would create no tasks. catchup=False keeps it harmless.
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # every run writes the same dataset, stores and index
    tags=["learn", "recommender", "training"],
    doc_md=__doc__,
    default_args=default_args(retries=1, retry_delay=timedelta(seconds=30), execution_timeout=timedelta(hours=2),
                              retry_exponential_backoff=True),
    params={
        "dataset": Param(None, type=["null", "string"],
                         description="Dataset name under $LEARN_HOME/data (registered public datasets are "
                                     "prepared on first use). Empty = pipeline.dataset from the config."),
        "mode": Param(None, type=["null", "string"], enum=[None, "full", "incremental"],
                      description="full: validate the whole history and retrain from scratch; incremental: "
                                  "only new logs, warm-start from the promoted model with a small budget. "
                                  "Empty = pipeline.scheduled_mode from the config (incremental)."),
        "window_days": Param(1, type="integer", minimum=1, maximum=365,
                             description="Incremental runs accept events from this many days before the "
                                         "interval end (1 = the run's own day; more accepts late events)."),
        "epochs": Param(None, type=["null", "integer"], minimum=1,
                        description="Training epoch limit; empty = pipeline.epochs / incremental_epochs."),
        "budget_s": Param(None, type=["null", "number"], minimum=0,
                          description="Training wall-clock budget in seconds; empty = pipeline.budget_s / "
                                      "incremental_budget_s."),
        "model": Param(None, type=["null", "string"], enum=[None, *MODEL_KINDS],
                       description="Candidate model kind to train; empty = pipeline.model from the config. The "
                                   "promotion gate serves it only if it is not worse than the promoted model "
                                   "on validation."),
    },
)
def learn_pipeline() -> None:
    validated = validate_logs()
    land_logs() >> validated
    features = refresh_user_features()
    shards = plan_encode_shards()
    validated >> [features, shards]
    trained = train_pch(encode_new_items.expand(shard=shards))
    features >> trained
    gate = promotion_gate(trained, evaluate(trained))
    load_milvus(gate) >> monitor() >> summarize()


learn_pipeline()
