"""The Airflow assets and the pool the DAGs share, named in one place so the producer and its consumers
cannot disagree. Light like :mod:`learn_tasks.orchestration.dag_tasks` (the scheduler imports it while
parsing): the standard library at the top, ``airflow.sdk`` inside the functions.

* ``learn_release``: a model released to serving. ``learn_pipeline``'s ``load_milvus`` emits it through
  the alias ``learn_release_events`` only when it released (a run that kept the served release and
  changed nothing emits no event); ``learn_monitoring`` runs on it, or daily.
* ``learn_new_items``: the item log, new item files in ``$LEARN_HOME/incoming/<dataset>/``; ``item_ingest``
  runs on it, or every 15 minutes. A producer emits it through the REST API
  (``POST /api/v2/assets/events``) or the UI (Assets -> learn_new_items -> create event).
* pool ``learn_milvus`` (one slot): the tasks that write a dataset's Milvus collection (``load_milvus``,
  ``upsert_items``) run one at a time. ``learn run`` and ``learn up`` create it when it is missing.
"""
from __future__ import annotations

from typing import Any, Mapping

MILVUS_POOL = "learn_milvus"
MILVUS_POOL_DOC = "tasks that write a dataset's Milvus collection (load_milvus, upsert_items): one at a time"
RELEASE_ASSET = ("learn_release", "file:///learn/serve/release")  # (name, uri): a model released to serving
RELEASE_ALIAS = "learn_release_events"  # load_milvus emits through it, only when it released
ITEM_LOG_ASSET = ("learn_new_items", "file:///learn/incoming/items")  # new item files for item_ingest


def release_asset():
    """The asset a release updates (``learn_monitoring`` schedules on it)."""
    from airflow.sdk import Asset  # noqa: PLC0415

    return Asset(name=RELEASE_ASSET[0], uri=RELEASE_ASSET[1], group="learn")


def release_alias():
    """``load_milvus``'s outlet: an alias that resolves to :func:`release_asset` only when a release happened."""
    from airflow.sdk import AssetAlias  # noqa: PLC0415

    return AssetAlias(name=RELEASE_ALIAS, group="learn")


def item_log_asset():
    """New item files (``item_ingest`` schedules on it; UI Assets -> create event, or the REST API)."""
    from airflow.sdk import Asset  # noqa: PLC0415

    return Asset(name=ITEM_LOG_ASSET[0], uri=ITEM_LOG_ASSET[1], group="learn")


def emit_release(outlet_events: Any, record: Mapping[str, Any]) -> None:
    """Emit the release asset event, with the release record's ids as its extra, through the alias."""
    extra = {k: record.get(k) for k in ("dataset", "release_id", "model_version", "collection", "run_key")}
    outlet_events[release_alias()].add(release_asset(), extra=extra)
