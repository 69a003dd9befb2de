"""The production stack of docker-compose.yml, run for real as local processes (tests/compose_local.py).

One stack for the module, started the way `docker compose up` would start it, from a ``.env`` written by
``docker/gen_env.py``:

* ``redis`` runs its compose command (a local ``redis-server``, the password in force);
* ``postgres`` is this machine's PostgreSQL with fresh databases and roles made by the stack's init script
  (its compose health check is run against it); ``milvus`` is a Milvus Lite server (same client API);
* every service that runs this project's code runs its compose command with its compose environment:
  ``airflow-init`` (one-off), ``airflow-apiserver``, ``airflow-scheduler``, ``airflow-dag-processor``,
  ``airflow-triggerer``, two replicas of ``airflow-worker`` (``--scale airflow-worker=2``, each with its own
  hostname, so its own Celery node name), ``learn-api``, ``evidently-ui``; and ``learn-train`` (one-off,
  torchrun) after the pipeline has run.

Then each becomes healthy by its own compose health check; the FAB login from ``.env`` works; no secret
is on any command line; and ``learn_pipeline`` runs on the CeleryExecutor over the Redis broker and the
PostgreSQL metadata DB, its encode shards spread over both workers, after which the service swaps in the
new model by itself.

Small settings (what an operator's override file would add): a generated dataset of 80 users and 120
items, encode shards of 20 items, one task per worker at a time, scheduled runs off (only the run the
test triggers). Two cores are enough; the timeouts are generous because other work may share them.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest

from compose_local import SECRET_VARS, LocalStack, free_port, stack_databases, uts_prefix, write_dotenv
from helpers import PG, pg_admin
from learn_tasks.config import load_settings
from learn_tasks.data import synth
from learn_tasks.processes import http_json, with_descendants

pytestmark = pytest.mark.production

LISTENS = {"redis": [6379], "airflow-apiserver": [8080], "airflow-scheduler": [8974], "airflow-worker": [8793],
           "airflow-triggerer": [8794], "learn-api": [8000], "evidently-ui": [8000]}
DATASET = "synth"
WORKERS = ("airflow-worker-1", "airflow-worker-2")
RUN_CONF = {"dataset": DATASET, "mode": "full", "epochs": 1, "budget_s": 5}
SMALL = {
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the run the test triggers
    "LEARN_SERVE__DATASET": DATASET, "LEARN_STACK__RELOAD_POLL_S": "2",
    "LEARN_ENCODE__SHARD_ITEMS": "20", "LEARN_PIPELINE__ENCODE_SHARDS": "6",
    "LEARN_TRAIN__VAL_USERS": "50", "LEARN_FEATURES__RECENT_ITEMS": "20",
}
START_TIMEOUT_S = 900
PIPELINE_TIMEOUT_S = 2400  # the whole DAG on two busy cores, every task a fresh process


def _prerequisites() -> list[str]:
    import shutil

    uts = uts_prefix()
    if uts is None:
        pytest.skip("`unshare --uts` is not allowed here: each container needs its own hostname")
    for exe in ("redis-server", "redis-cli", "pg_isready", "bash"):
        if shutil.which(exe) is None:
            pytest.skip(f"{exe} is not installed")
    pg_admin().close()  # skips when PostgreSQL is not reachable
    return uts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    from learn_tasks.online import milvus_server

    uts = _prerequisites()
    root = tmp_path_factory.mktemp("compose")
    tag = uuid.uuid4().hex[:8]
    names = {"AIRFLOW_DB_NAME": f"learn_t_af_{tag}", "AIRFLOW_DB_USER": f"learn_t_af_{tag}",
             "FEAST_DB_NAME": f"learn_t_fe_{tag}", "FEAST_DB_USER": f"learn_t_fe_{tag}",
             "LEARN_DB_NAME": f"learn_t_ev_{tag}", "LEARN_DB_USER": f"learn_t_ev_{tag}"}
    dotenv = write_dotenv(root / ".env", {**names, "LEARN_DATA_DIR": str(root / "data"),
                                          "LEARN_INCOMING_DIR": str(root / "incoming"),
                                          "AIRFLOW_WORKER_CONCURRENCY": "1"})
    lite = load_settings(env={"LEARN_HOME": str(root / "milvus-lite")})
    local: LocalStack | None = None
    state: dict[str, Any] = {"root": root, "dotenv": dotenv}
    with stack_databases(dotenv, tag, PG) as made:
        assert made == names
        try:
            server = milvus_server.start(lite, port=free_port())
            standins = {"postgres:5432": f"{PG['host']}:{PG['port']}", "milvus:19530": server["uri"].split("//")[1]}
            local = LocalStack(root, dotenv, standins, LISTENS, extra_env=SMALL, uts=uts)
            t0 = time.monotonic()
            redis = local.up("redis")
            took = local.wait_healthy([redis], timeout_s=60)
            pg_check = local.service("postgres")["healthcheck"]["test"]
            state["postgres_check"] = local.exec_in(redis, pg_check[1:], timeout_s=60)
            init = local.run_once("airflow-init", timeout_s=START_TIMEOUT_S)
            took[init.name] = round(time.time() - init.born, 1)
            api = local.up("airflow-apiserver")
            others = [local.up(s) for s in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                                            "learn-api", "evidently-ui")]
            took |= local.wait_healthy([api], timeout_s=START_TIMEOUT_S)  # the workers wait for it (depends_on)
            workers = [local.up("airflow-worker") for _ in WORKERS]
            took |= local.wait_healthy([*others, *workers], timeout_s=START_TIMEOUT_S)
            state.update(stack=local, api=api, workers=workers, startup_s=round(time.monotonic() - t0, 1),
                         healthy_after_s=took, by_name={i.name: i for i in local.instances})
            yield state
        finally:
            if local is not None:
                local.down()
            milvus_server.stop(lite)


# ==================================================================================================
# Helpers: the Airflow REST API with the FAB login from .env
# ==================================================================================================
def _url(state, service: str, path: str) -> str:
    inst = state["by_name"][service]
    return f"http://127.0.0.1:{next(iter(inst.ports.values()))}{path}"


def _request(url: str, body: Any = None, method: str | None = None, headers: dict | None = None,
             timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def _token(state, user: str | None = None, password: str | None = None) -> tuple[int, Any]:
    env = state["dotenv"]
    login = {"username": user or env["AIRFLOW_ADMIN_USER"], "password": password or env["AIRFLOW_ADMIN_PASSWORD"]}
    return _request(_url(state, "airflow-apiserver", "/auth/token"), login)


def _call(state, path: str, body: Any = None, method: str | None = None) -> tuple[int, Any]:
    """The REST API as the admin of .env (a JWT from FAB's /auth/token)."""
    if "token" not in state:
        code, out = _token(state)
        assert code in (200, 201), (code, out)
        state["token"] = out["access_token"]
    for _ in range(5):  # a busy machine: retry what a slow server answers with 5xx
        code, out = _request(_url(state, "airflow-apiserver", path), body, method,
                             {"Authorization": f"Bearer {state['token']}"})
        if code < 500:
            break
        time.sleep(5)
    return code, out


def _api(state, path: str, body: Any = None, method: str | None = None, ok: tuple[int, ...] = (200,)) -> Any:
    code, out = _call(state, path, body, method)
    assert code in ok, f"{method or 'GET'} {path}: {code} {out}"
    return out


def _fail_with_logs(state, message: str) -> None:
    home = state["root"] / "volumes" / "learn-home"
    notes = "\n".join(p.read_text()[-1500:] for p in home.glob("pipeline/*/failures/*.json"))
    logs = "\n".join(f"--- {i.name}\n{i.tail(25)}" for i in state["stack"].instances)
    pytest.fail(f"{message}\n{notes}\n{logs}")


def _run_pipeline(state) -> dict[str, Any]:
    """Prepare the dataset in a worker (`docker compose exec`), trigger learn_pipeline, wait for the end."""
    if "run" in state:
        return state["run"]
    worker = state["workers"][0]
    src = synth.write_seqrec(state["root"] / "src", synth.SynthSpec(n_users=80, n_items=120, seed=7))
    done = state["stack"].exec_in(worker, ["learn", "data", "prepare", "--format", "seqrec", "--input", str(src),
                                           "--name", DATASET])
    assert done.returncode == 0, done.stderr[-3000:]
    deadline = time.monotonic() + 600
    while _call(state, "/api/v2/dags/learn_pipeline")[0] != 200:
        assert time.monotonic() < deadline, "the dag-processor never parsed learn_pipeline"
        time.sleep(5)
    _api(state, "/api/v2/dags/learn_pipeline", {"is_paused": False}, method="PATCH")
    t0 = time.monotonic()
    run = _api(state, "/api/v2/dags/learn_pipeline/dagRuns",
               {"logical_date": datetime.now(timezone.utc).isoformat(), "conf": RUN_CONF})
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")
    while run["state"] not in ("success", "failed"):
        if time.monotonic() - t0 > PIPELINE_TIMEOUT_S:
            _fail_with_logs(state, f"learn_pipeline still {run['state']} after {PIPELINE_TIMEOUT_S} s")
        dead = [i.name for i in state["stack"].instances if i.proc is not None and i.exited() is not None
                and i.service not in ("airflow-init", "learn-train")]
        if dead:
            _fail_with_logs(state, f"{dead} exited during the run")
        time.sleep(10)
        run = _api(state, f"/api/v2/dags/learn_pipeline/dagRuns/{quoted}")
    wall = round(time.monotonic() - t0, 1)
    tis = _api(state, f"/api/v2/dags/learn_pipeline/dagRuns/{quoted}/taskInstances?limit=100")["task_instances"]
    states = {t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t["state"] for t in tis}
    if run["state"] != "success":
        _fail_with_logs(state, f"learn_pipeline {run['state']}: {states}")
    state["run"] = {"run": run, "tis": tis, "states": states, "wall_s": wall}
    return state["run"]


def _secret_free(state, procs: list[psutil.Process]) -> list[str]:
    values = [state["dotenv"][k] for k in SECRET_VARS]
    leaks = []
    for p in procs:
        try:
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        leaks += [f"{p.pid}: {cmdline[:120]}" for v in values if v and v in cmdline]
    return leaks


def _all_processes(state) -> list[psutil.Process]:
    out = []
    for inst in state["stack"].instances:
        if inst.proc is not None and inst.exited() is None:
            try:
                out += with_descendants(psutil.Process(inst.proc.pid))
            except psutil.Error:
                pass
    return out


# ==================================================================================================
# Tests
# ==================================================================================================
def test_every_service_runs_from_its_compose_definition_and_becomes_healthy(stack, capsys) -> None:
    took = stack["healthy_after_s"]
    expected = {"redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "learn-api", "evidently-ui", *WORKERS}
    assert set(took) == expected, took
    with capsys.disabled():
        print(f"\ncompose stack healthy after {stack['startup_s']} s; per container (s from its start): {took}")
    # postgres: the compose health check (over TCP) passes against the server standing in for it.
    assert stack["postgres_check"].returncode == 0, stack["postgres_check"].stderr

    # Redis: the password is in force, and it is on no command line (nor is any other secret).
    port = stack["by_name"]["redis"].ports[6379]
    import redis as redis_py

    with pytest.raises(redis_py.exceptions.AuthenticationError):
        redis_py.Redis(port=port, socket_connect_timeout=3).ping()
    assert redis_py.Redis(port=port, password=stack["dotenv"]["REDIS_PASSWORD"]).ping()
    procs = _all_processes(stack)
    assert len(procs) > len(took), "expected every long-running container's processes"
    assert _secret_free(stack, procs) == []

    # Airflow with the FAB auth manager: the admin login from .env works, a wrong password does not, the
    # configuration is not exposed ([api] expose_config).
    code, out = _token(stack)
    assert code in (200, 201) and out["access_token"], (code, out)
    assert _token(stack, password="not-the-password")[0] == 401
    assert _request(_url(stack, "airflow-apiserver", "/api/v2/dags"))[0] == 401
    assert _api(stack, "/api/v2/config", ok=(403,))
    version = _api(stack, "/api/v2/version")
    assert version["version"] == "3.3.2"
    # Both workers are Celery nodes of their own (the health checks pinged celery@<hostname> of each).
    inspect = stack["stack"].exec_in(stack["workers"][0], ["celery", "--app",
                                                            "airflow.providers.celery.executors.celery_executor.app",
                                                            "inspect", "ping", "--json"], timeout_s=120)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert {f"celery@{w}" for w in WORKERS} <= set(json.loads(inspect.stdout.strip().splitlines()[-1]))

    # learn-api: up before any model exists (popular items), and says what it waits for.
    code, body = http_json(_url(stack, "learn-api", "/health"))
    assert code == 200 and body["status"] == "degraded" and "no model yet" in body["reason"], (code, body)
    # evidently-ui: serves the workspace airflow-init created; its write API wants the secret.
    assert (stack["root"] / "volumes" / "learn-home" / "evidently").is_dir()
    assert http_json(_url(stack, "evidently-ui", "/api/version"))[0] == 200
    code, _ = _request(_url(stack, "evidently-ui", "/api/projects"), {"name": "intruder", "description": ""})
    assert code in (401, 403), code


def test_celery_executor_runs_learn_pipeline_on_both_workers(stack, capsys) -> None:
    result = _run_pipeline(stack)
    tis = result["tis"]
    assert all(s == "success" for s in result["states"].values()), result["states"]
    shards = [t for t in tis if t["task_id"] == "encode_new_items"]
    assert len(shards) == 6, result["states"]
    hosts = Counter(t["hostname"] for t in tis)
    shard_hosts = Counter(t["hostname"] for t in shards)
    assert set(hosts) <= set(WORKERS), hosts  # every task ran on a Celery worker, none elsewhere
    assert set(shard_hosts) == set(WORKERS), f"encode shards ran on {dict(shard_hosts)} only"
    run = result["run"]
    with capsys.disabled():
        print(f"\nlearn_pipeline on CeleryExecutor: {len(tis)} task instances, run {run['start_date']} -> "
              f"{run['end_date']} (polled wall {result['wall_s']} s); tasks per worker {dict(hosts)}, "
              f"encode shards per worker {dict(shard_hosts)}")
    # The Celery result backend and the metadata are in PostgreSQL; the Feast registry too.
    import psycopg2

    names = stack["dotenv"]
    with psycopg2.connect(dbname=names["FEAST_DB_NAME"], **PG) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM feature_views")
        assert cur.fetchone()[0] > 0
    # The service swaps in the promoted, indexed model by itself and answers.
    deadline = time.monotonic() + 300
    while True:  # 200 "degraded" while no release is served yet (each worker loads it on its own)
        code, body = http_json(_url(stack, "learn-api", "/health"))
        if code == 200 and body.get("status") == "ok":
            break
        assert time.monotonic() < deadline, (code, body)
        time.sleep(3)
    assert body["dataset"] == DATASET
    code, recs = http_json(_url(stack, "learn-api", "/recommendations/1"))
    assert code == 200 and recs["items"], (code, recs)
    # The promotion and the release the service follows are in the stack's PostgreSQL (state.backend:
    # postgres), shared by every worker and replica, and not in files on the volume.
    with psycopg2.connect(dbname=names["LEARN_DB_NAME"], **PG) as c, c.cursor() as cur:
        cur.execute("SELECT r.model_version FROM learn_release_current c JOIN learn_releases r "
                    "ON r.dataset = c.dataset AND r.release_id = c.release_id WHERE c.dataset = %s", (DATASET,))
        released = cur.fetchone()
        cur.execute("SELECT run_id FROM learn_promoted WHERE dataset = %s", (DATASET,))
        promoted = cur.fetchone()
    assert released is not None and promoted is not None
    assert released[0] == promoted[0] == body["release"]["model_version"]
    home = stack["root"] / "volumes" / "learn-home"
    assert not (home / "serve" / DATASET / "release.json").exists()
    assert not (home / "models" / DATASET / "PROMOTED").exists()


def test_learn_train_runs_torchrun_from_its_compose_definition(stack) -> None:
    _run_pipeline(stack)  # embeddings and the prepared dataset
    inst = stack["stack"].run_once("learn-train", command=["--dataset", DATASET, "--epochs", "1", "--budget-s", "5"],
                                   timeout_s=900)
    lines = [line for line in inst.log.read_text(errors="replace").splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1])
    assert summary["world_size"] == int(stack["dotenv"]["LEARN_TRAIN_PROCS"]) and summary["backend"] == "gloo"
    # rank 0 wrote the run into the shared LEARN_HOME volume
    run_dir = Path(summary["run_dir"])
    assert run_dir.is_dir() and stack["root"] / "volumes" / "learn-home" in run_dir.parents
