"""Shared fixtures: an isolated LEARN_HOME per test and small generated datasets."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# Keep every library offline and quiet: nothing may reach a model hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from learn_tasks.data import datasets as data  # noqa: E402
from learn_tasks.data import synth  # noqa: E402
from learn_tasks.config import Settings, load_settings  # noqa: E402
from learn_tasks import state  # noqa: E402
from helpers import PG, pg_admin  # noqa: E402  (tests/helpers.py)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings whose LEARN_HOME is a fresh temporary folder."""
    home = tmp_path / "learn_home"
    monkeypatch.setenv("LEARN_HOME", str(home))
    return load_settings()


@pytest.fixture
def synth_dataset(settings: Settings, tmp_path: Path) -> str:
    """A small generated dataset, prepared as 'synth' under the test's LEARN_HOME."""
    src = synth.write_seqrec(tmp_path / "synth_src", synth.SynthSpec(n_users=200, n_items=300))
    data.prepare_dataset(settings, "seqrec", src, "synth")
    return "synth"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test module (production tests), dropped afterwards."""
    admin = pg_admin()
    name = f"learn_t_pg_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        state.close_stores()  # the shared-state pools of this process: their database goes now
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary AIRFLOW_HOME whose SQLite metadata DB is migrated once per test module (the
    pipeline runs of a test module's ``runner.run_pipeline(..., airflow_home=...)`` share it; modules do not,
    since runs of the same DAG and day in one metadata DB would meet each other's task instances)."""
    from learn_tasks.orchestration import airflow_env

    home = tmp_path_factory.mktemp("airflow_home")
    airflow_env.configure_airflow(home)
    return home
