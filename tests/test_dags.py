"""DAG integrity: the dags folder parses without errors, cheaply, and every DAG follows the house rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
HEAVY = ("torch", "transformers", "great_expectations", "feast", "pymilvus", "evidently", "learn_tasks")
# What a DAG file may load of ours while it is parsed: the model kinds and the task helper, nothing of a stage.
LIGHT = ("learn_tasks", "learn_tasks.config", "learn_tasks.paths", "learn_tasks.orchestration",
         "learn_tasks.orchestration.dag_tasks", "learn_tasks.orchestration.assets")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    """The project's DagBag, parsed with Airflow pointed at a temporary home (nothing under ~/airflow)."""
    home = tmp_path_factory.mktemp("airflow_home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    t0 = time.perf_counter()
    bag = DagBag(dag_folder=str(DAGS))
    bag.parse_seconds = time.perf_counter() - t0
    return bag


def test_dagbag_has_no_import_errors(dagbag, record_property) -> None:
    assert dagbag.import_errors == {}
    assert {"learn_pipeline", "item_ingest"} <= set(dagbag.dags)
    record_property("dags_parse_seconds", round(dagbag.parse_seconds, 3))  # measured, not asserted
    print(f"parsed {len(dagbag.dags)} DAGs from {DAGS} in {dagbag.parse_seconds:.2f} s")


def test_every_dag_follows_the_rules(dagbag) -> None:
    for dag in dagbag.dags.values():  # every DAG of the folder, not only ours
        assert dag.tags and "learn" in dag.tags, dag.dag_id
        assert dag.doc_md and len(dag.doc_md) > 200, dag.dag_id
        assert dag.catchup is False, dag.dag_id
        assert dag.start_date is not None and dag.start_date.tzinfo is not None, dag.dag_id
        assert dag.max_active_runs == 1, dag.dag_id
        for t in dag.tasks:
            where = f"{dag.dag_id}.{t.task_id}"
            assert t.retries >= 1, where
            assert t.on_failure_callback, where
            assert t.doc_md, where  # every task says what it does (from its docstring)
            assert t.execution_timeout is not None, where


def test_learn_pipeline_shape_and_params(dagbag) -> None:
    dag = dagbag.dags["learn_pipeline"]
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert up["land_logs"] == set()
    assert up["validate_logs"] == {"land_logs"}
    assert up["refresh_user_features"] == {"validate_logs"}
    assert up["plan_encode_shards"] == {"validate_logs"}
    assert up["encode_new_items"] == {"plan_encode_shards"}
    assert up["train_pch"] == {"encode_new_items", "refresh_user_features"}
    assert up["evaluate"] == {"train_pch"}
    assert up["promotion_gate"] == {"train_pch", "evaluate"}
    assert up["load_milvus"] == {"promotion_gate"}
    assert up["monitor"] == {"load_milvus"}
    assert up["summarize"] == {"monitor"}
    assert dag.get_task("encode_new_items").is_mapped  # dynamic task mapping over shards
    params = dag.params
    assert set(params) == {"dataset", "mode", "window_days", "epochs", "budget_s", "model"}
    from learn_tasks.config import MODEL_KINDS

    assert set(params.get_param("model").schema["enum"]) == {None, *MODEL_KINDS}  # empty = pipeline.model
    assert params.get_param("mode").schema["enum"] == [None, "full", "incremental"]  # empty = pipeline.mode
    assert params.get_param("mode").value is None
    assert "integer" in params.get_param("epochs").schema["type"]
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"  # daily, with a real data interval
    assert dag.timetable.expression == "0 0 * * *"


def test_item_ingest_is_asset_triggered(dagbag) -> None:
    dag = dagbag.dags["item_ingest"]
    assert [t.task_id for t in dag.topological_sort()] == ["land_items", "validate_items", "encode_items",
                                                          "upsert_items"]
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"  # every 15 minutes or on a new-items event
    assert "learn_new_items" in str(dag.timetable.asset_condition)
    assert dag.get_task("land_items").task_type.lower().startswith("_shortcircuit")  # no new file: skip the rest


def test_release_asset_pool_and_schedules(dagbag) -> None:
    """learn_pipeline's load_milvus emits the release asset (through an alias: only when it released),
    learn_monitoring runs on it or daily, and the two Milvus writers share the one-slot pool."""
    from airflow.sdk import AssetAlias

    from learn_tasks.orchestration import assets

    load = dagbag.dags["learn_pipeline"].get_task("load_milvus")
    aliases = [o for o in load.outlets if isinstance(o, AssetAlias)]
    assert [a.name for a in aliases] == [assets.RELEASE_ALIAS]
    writers = {t.task_id: t.pool for d in dagbag.dags.values() for t in d.tasks if t.pool == assets.MILVUS_POOL}
    assert writers == {"load_milvus": assets.MILVUS_POOL, "upsert_items": assets.MILVUS_POOL}
    others = [t for t in dagbag.dags["learn_pipeline"].tasks if t.task_id != "load_milvus"]
    assert all(t.pool != assets.MILVUS_POOL and not t.outlets for t in others)

    mon = dagbag.dags["learn_monitoring"]
    assert type(mon.timetable).__name__ == "AssetOrTimeSchedule"  # on each release, or daily
    assert assets.RELEASE_ASSET[0] in str(mon.timetable.asset_condition)
    assert mon.timetable.timetable.expression == "0 0 * * *"
    ingest = dagbag.dags["item_ingest"]
    assert assets.ITEM_LOG_ASSET[0] in str(ingest.timetable.asset_condition)
    assert ingest.timetable.timetable.expression == "*/15 * * * *"


def test_the_milvus_pool_is_created_once_and_kept(tmp_path: Path) -> None:
    """`learn run` creates the pool when it is missing and leaves an operator's own size alone."""
    code = (
        "import sys; from pathlib import Path\n"
        "from learn_tasks.orchestration import airflow_env as ae\n"
        "ae.configure_airflow(Path(sys.argv[1]))\n"
        "first, second = ae.ensure_pool(), ae.ensure_pool()\n"
        "from airflow.models import Pool\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    p = s.query(Pool).filter(Pool.pool == 'learn_milvus').one()\n"
        "    slots = p.slots; p.slots = 3\n"
        "third = ae.ensure_pool()\n"
        "with create_session() as s:\n"
        "    kept = s.query(Pool).filter(Pool.pool == 'learn_milvus').one().slots\n"
        "print(first, second, slots, third, kept)\n"
    )
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "airflow")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True False 1 False 3"


def test_parsing_imports_no_heavy_module(tmp_path: Path) -> None:
    """Heavy libraries (and the learn_tasks stages) load inside tasks, never when the scheduler parses."""
    code = (
        "import runpy, sys, json\n"
        f"for f in {sorted(str(p) for p in DAGS.glob('*.py'))!r}:\n"
        "    runpy.run_path(f)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if m not in LIGHT] == []
