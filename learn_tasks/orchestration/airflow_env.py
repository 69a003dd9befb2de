"""The one place that says how this project's Airflow is configured: home, metadata DB, DAG folder,
logs, whether the metadata DB was migrated by this Airflow version, and the pool of the Milvus writers.

``learn run`` (:mod:`learn_tasks.orchestration.runner`) and ``learn up`` (:mod:`learn_tasks.ops.stack`)
both build on :func:`airflow_env`, so runs from either show up in the same UI.
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import version
from pathlib import Path

from learn_tasks.config import REPO_ROOT
from learn_tasks.orchestration.assets import MILVUS_POOL, MILVUS_POOL_DOC
from learn_tasks.storage import write_text

DAGS_FOLDER = REPO_ROOT / "dags"
STAMP = ".migrated"  # in AIRFLOW_HOME: the Airflow version that last created or migrated the DB


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


def airflow_version() -> str:
    return version("apache-airflow-core")


def is_migrated(home: Path) -> bool:
    """Whether the SQLite metadata DB in ``home`` exists and this Airflow version created or migrated it."""
    stamp = Path(home) / STAMP
    return (Path(home) / "airflow.db").exists() and stamp.exists() and stamp.read_text().strip() == airflow_version()


def mark_migrated(home: Path) -> None:
    write_text(airflow_version() + "\n", Path(home) / STAMP)


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

    if fresh:
        db.resetdb()  # a new SQLite metadata DB with every table at the current migration
    elif not is_migrated(home):
        db.initdb()  # an existing DB made by another Airflow version: upgrade it
    mark_migrated(home)
    return db_file


def ensure_pool() -> bool:
    """Create the one-slot pool of the tasks that write the Milvus collection, unless it exists (an operator's
    own size is kept). Returns whether it was created. Needs a configured metadata DB."""
    from airflow.models import Pool
    from airflow.utils.session import create_session

    with create_session() as session:
        if session.query(Pool).filter(Pool.pool == MILVUS_POOL).first() is not None:
            return False
        session.add(Pool(pool=MILVUS_POOL, slots=1, description=MILVUS_POOL_DOC, include_deferred=False))
    return True
