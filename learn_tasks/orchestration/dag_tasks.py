"""The one task helper the DAG files are built from: light enough for the scheduler to import while
parsing (the standard library and ``airflow.sdk`` only); the stages load inside the running task.

Each task is one call into :func:`learn_tasks.orchestration.tasks.task_call`, named after its stage, with
the stage's docstring as the task's documentation::
    land = stage_task("land_logs", "Move new log and item files into this interval's landing folder.")
    validated = stage_task("validate_logs", "...")()
    land() >> validated

The assets and the pool the DAGs share are defined in :mod:`learn_tasks.orchestration.assets` (light as
well) and re-exported here.
"""
from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

from learn_tasks.orchestration.assets import (ITEM_LOG_ASSET, MILVUS_POOL, MILVUS_POOL_DOC, RELEASE_ALIAS,
                                              RELEASE_ASSET, item_log_asset, release_alias, release_asset)

__all__ = ["ITEM_LOG_ASSET", "MILVUS_POOL", "MILVUS_POOL_DOC", "RELEASE_ALIAS", "RELEASE_ASSET", "default_args",
           "item_log_asset", "on_failure", "on_retry", "release_alias", "release_asset", "stage_task"]


def _task_call(stage: str, *args: Any) -> Any:
    # Imported here, not at the top: parsing a DAG file must not load the stages (torch, Feast, Milvus ...).
    from learn_tasks.orchestration.tasks import task_call  # noqa: PLC0415

    return task_call(stage, *args)


def on_failure(context: Mapping[str, Any]) -> None:
    """Failure callback of every task: one clear line in the log and a record under the run's failures/."""
    from learn_tasks.orchestration.tasks import on_task_failure  # noqa: PLC0415

    on_task_failure(context)


def on_retry(context: Mapping[str, Any]) -> None:
    from learn_tasks.orchestration.tasks import on_task_retry  # noqa: PLC0415

    on_task_retry(context)


def default_args(retries: int, retry_delay: timedelta, execution_timeout: timedelta, **more: Any) -> dict[str, Any]:
    """``default_args`` shared by the project's DAGs: owner, retries, timeouts and the callbacks above."""
    return {"owner": "learn", "retries": retries, "retry_delay": retry_delay,
            "execution_timeout": execution_timeout, "on_failure_callback": on_failure,
            "on_retry_callback": on_retry, **more}


def stage_task(stage: str, doc: str, inputs: Sequence[str] = (), decorator: Callable[..., Any] | None = None,
               task_id: str | None = None, **task_kwargs: Any):
    """A TaskFlow task (id ``task_id``, default ``stage``) that runs the stage ``stage``.

    ``inputs`` names the task's arguments (upstream results such as ``trained``, or the mapped ``shard``);
    they are passed on to the stage in that order. ``decorator`` is another TaskFlow decorator
    (``task.short_circuit``); ``task_kwargs`` go to it (``max_active_tis_per_dagrun``, ``outlets``,
    ``pool``, ...).
    """
    # DAG files import airflow anyway; importing it here keeps this module importable without it.
    from airflow.sdk import task  # noqa: PLC0415

    signature = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in inputs])

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        return _task_call(stage, *bound.args)

    call.__signature__ = signature  # type: ignore[attr-defined] - what TaskFlow reads to name the arguments
    call.__name__ = call.__qualname__ = task_id or stage
    call.__doc__ = doc
    return (decorator or task)(task_id=task_id or stage, doc_md=doc, **task_kwargs)(call)
