"""The production stack: docker-compose.yml against the Compose specification, the production profile
loaded against it, and that profile run for real on PostgreSQL (Airflow metadata DB, Feast registry),
Redis (Feast online store) and a Milvus server URI.

No Docker engine runs here, so the compose file is checked by the specification's JSON schema (vendored
in tests/data, see compose-spec.NOTICE.md) and by interpolating it the way `docker compose` does
(tests/compose_local.py); the services it points at are exercised with the same settings against the
local PostgreSQL and Redis. tests/test_compose_stack.py runs the services themselves.
"""
from __future__ import annotations

import json
import shlex
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import jsonschema
import numpy as np
import pytest
import yaml

from compose_local import (COMPOSE, SECRET_VARS, env_example, generated_env, interpolate, load_compose, read_image,
                           service_env, stack_databases as make_stack_databases, variables)
from helpers import PG, free_port, pg_admin
from learn_tasks.config import REPO_ROOT, load_settings

SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
PROFILE = REPO_ROOT / "configs" / "production.yaml"

LONG_RUNNING = {"postgres", "redis", "etcd", "minio", "milvus", "airflow-apiserver", "airflow-scheduler",
                "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "learn-api", "evidently-ui"}


# ==================================================================================================
# The compose file (fast, no services needed)
# ==================================================================================================
def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(load_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_schema_rejects_a_broken_compose_file() -> None:
    # The vendored schema is live: a misspelt key fails.
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = load_compose()
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_stack_services_health_checks_and_volumes() -> None:
    compose = load_compose()
    services = compose["services"]
    assert LONG_RUNNING <= set(services), f"missing services: {LONG_RUNNING - set(services)}"
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no health check"
        assert services[name].get("restart") == "always", f"{name} is not restarted"
    named_volumes = set(compose["volumes"])
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in named_volumes, f"{name} mounts undeclared volume {source}"
        image = interpolate(svc.get("image", ""), {})
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image ({image!r})"
    # What is deployed is what was tested: both images install the project, Airflow and its providers
    # included, with the constraints file the test suite runs with, on the same Python.
    for name in ("airflow.Dockerfile", "service.Dockerfile"):
        text = (REPO_ROOT / "docker" / name).read_text(encoding="utf-8")
        assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M), name
        assert re.search(r"^RUN pip install -c constraints\.txt -e \.$", text, re.M), name
    assert read_image(REPO_ROOT / "docker" / "airflow.Dockerfile").entrypoint == ["airflow"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker", "airflow-init"):
        assert services[name]["build"]["dockerfile"] == "docker/airflow.Dockerfile"
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("fab_auth_manager.FabAuthManager")
    assert services["airflow-worker"]["command"] == "celery worker"
    # PostgreSQL is healthy only once it answers over TCP (not on the socket the init scripts use).
    assert services["postgres"]["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]
    # Only the front doors are published, and on a configurable (loopback by default) address.
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"airflow-apiserver", "learn-api", "evidently-ui"}
    for n in published:
        assert all(p.startswith("${LEARN_BIND_ADDRESS:-127.0.0.1}:") for p in services[n]["ports"])


def test_images_carry_the_files_the_package_reads_beside_itself() -> None:
    """learn_tasks finds configs/, feature_repo/, monitoring/ and dags/ at REPO_ROOT: the images install the
    package editable from /opt/learn/src and copy each of those folders there."""
    used = set()
    for path in (REPO_ROOT / "learn_tasks").rglob("*.py"):
        used |= set(re.findall(r'REPO_ROOT\s*/\s*"([^"]+)"', path.read_text(encoding="utf-8")))
    assert {"configs", "feature_repo", "dags"} <= used
    for name in ("airflow.Dockerfile", "service.Dockerfile"):
        text = (REPO_ROOT / "docker" / name).read_text(encoding="utf-8")
        assert re.search(r"pip install [^\n]*-e ", text), f"{name}: install the package editable"
        for folder in used:
            assert re.search(rf"^COPY (--chown=\S+ )?{folder} ", text, re.M), f"{name} does not copy {folder}/"


def test_milvus_server_major_is_the_client_major() -> None:
    """The Milvus server the stack runs speaks the protocol of the pymilvus the code is tested with."""
    from importlib.metadata import version

    client_major = version("pymilvus").split(".")[0]
    image = interpolate(load_compose()["services"]["milvus"]["image"], {})
    for tag in (image, env_example()["MILVUS_IMAGE"]):
        m = re.fullmatch(r"milvusdb/milvus:v(\d+)\.(\d+)\.(\d+)", tag)
        assert m and m.group(1) == client_major, f"{tag} vs pymilvus {version('pymilvus')}"
    # and its etcd and MinIO are pinned, from registries that still serve them
    services = load_compose()["services"]
    assert services["etcd"]["image"] == "quay.io/coreos/etcd:v3.5.25"
    assert services["minio"]["image"].startswith("quay.io/minio/minio:RELEASE.")
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


def test_no_secret_is_written_on_a_command_line() -> None:
    """`ps` shows command lines to every user: secrets reach processes through the environment only."""
    compose, env = load_compose(), generated_env()
    assert set(SECRET_VARS) == {k for k, v in env_example().items() if v == ""}  # every generated secret
    secrets = [env[k] for k in SECRET_VARS]
    assert all(secrets)
    for name, svc in compose["services"].items():
        for key in ("command", "entrypoint"):
            value = svc.get(key)
            argv = shlex.split(value) if isinstance(value, str) else list(value or [])
            text = interpolate(json.dumps(argv), env)
            assert not any(s in text for s in secrets), f"{name}: a secret in its {key}"
        test = svc.get("healthcheck", {}).get("test", [])
        text = interpolate(json.dumps(test), env)
        assert not any(s in text for s in secrets), f"{name}: a secret in its health check"


def test_airflow_settings_in_the_compose_file_are_airflow_3_options() -> None:
    """Every AIRFLOW__SECTION__KEY the compose file sets is an option of Airflow 3.3 or its providers
    (2.x's [webserver] expose_config, say, would silently do nothing)."""
    from airflow.configuration import conf

    options = conf.configuration_description  # Airflow's own options and every installed provider's
    names = set()
    for svc in load_compose()["services"].values():
        names |= {k for k in (svc.get("environment") or {}) if k.startswith("AIRFLOW__")}
    assert "AIRFLOW__API__EXPOSE_CONFIG" in names and not any(n.startswith("AIRFLOW__WEBSERVER__") for n in names)
    for name in sorted(names):
        section, key = name[len("AIRFLOW__"):].lower().split("__", 1)
        assert key in options.get(section, {}).get("options", {}), f"{name}: Airflow has no option [{section}] {key}"


def test_every_compose_variable_is_in_env_example() -> None:
    used = variables(COMPOSE.read_text(encoding="utf-8")) - {"HOSTNAME"}  # $${HOSTNAME}: the container's own
    documented = set(env_example())
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"


def test_missing_secret_stops_interpolation() -> None:
    compose_text = COMPOSE.read_text(encoding="utf-8")
    env = generated_env()
    interpolate(compose_text, env)  # complete .env: fine
    env.pop("REDIS_PASSWORD")
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(compose_text, env)


def test_production_profile_loads_against_the_compose_environment(tmp_path: Path) -> None:
    """The settings every learn container gets: production.yaml + the environment compose gives it."""
    compose = load_compose()
    env = generated_env()
    for service in ("learn-api", "airflow-worker", "airflow-scheduler"):
        container_env = service_env(compose, service, env)
        assert container_env["LEARN_CONFIG"] == "/opt/learn/src/configs/production.yaml"
        container_env["LEARN_CONFIG"] = str(PROFILE)  # the same file, from the checkout
        container_env["LEARN_HOME"] = str(tmp_path / "home")
        cfg = load_settings(env=container_env)
        assert cfg.features.online_store == "redis" and cfg.features.registry == "sql"
        assert cfg.features.offline_store == "postgres"
        assert cfg.features.registry_url == (f"postgresql+psycopg2://feast:{env['FEAST_DB_PASSWORD']}"
                                             "@postgres:5432/feast")
        assert cfg.features.redis_url == f"redis:6379,db=0,password={env['REDIS_PASSWORD']}"
        assert cfg.index.uri == "http://milvus:19530"
        assert cfg.index.token == f"root:{env['MILVUS_ROOT_PASSWORD']}"
        assert cfg.index.index_type == "HNSW" and cfg.index.index_params["M"] >= 32
        assert cfg.index.search_params["ef"] >= 10
        assert cfg.serve.search == "milvus" and cfg.serve.token_env == "LEARN_API_TOKEN"
        assert cfg.eventlog.backend == "postgres"
        assert cfg.eventlog.url == f"postgresql://learn:{env['LEARN_DB_PASSWORD']}@postgres:5432/learn"
        assert cfg.state.backend == "postgres" and cfg.state.url == cfg.eventlog.url  # the same database
    api_env = service_env(compose, "learn-api", env)
    assert api_env["LEARN_API_TOKEN"] == env["LEARN_API_TOKEN"]


@pytest.mark.integration
def test_compose_environment_makes_a_valid_feast_config(tmp_path: Path) -> None:
    """Feast accepts the compose connection strings; its rendered file keeps them out (``${...}``)."""
    from learn_tasks.online import features

    compose = load_compose()
    env = generated_env()
    container_env = {**service_env(compose, "learn-api", env), "LEARN_CONFIG": str(PROFILE),
                     "LEARN_HOME": str(tmp_path / "home")}
    cfg = load_settings(env=container_env)
    conf = features.repo_config(cfg, "books", write=True)
    assert conf.online_store.type == "redis" and conf.registry.registry_type == "sql"
    # The offline tables: PostgreSQL, in the registry's database (no URL of their own in the compose file).
    assert cfg.features.offline_store == "postgres" and cfg.features.offline_url is None
    assert (conf.offline_store.host, conf.offline_store.database, conf.offline_store.user,
            conf.offline_store.db_schema) == ("postgres", "feast", "feast", "learn_books")
    rendered = (features.store_dir(cfg, "books") / "feature_store.yaml").read_text(encoding="utf-8")
    assert env["REDIS_PASSWORD"] not in rendered and env["FEAST_DB_PASSWORD"] not in rendered


def test_profile_holds_no_credentials() -> None:
    raw = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    values = json.dumps(raw)  # the settings, without the comments that describe the variables
    assert not re.search(r"://[^/\s:@\"]+:[^@\s\"]+@", values), "a URL with a password in production.yaml"
    for section, values in raw.items():
        if isinstance(values, dict):
            for key in values:
                assert not re.search(r"password|secret|token$|_url$", key), f"{section}.{key} belongs in the env"


# ==================================================================================================
# For real: PostgreSQL and Redis on this machine
# ==================================================================================================


@pytest.fixture
def stack_databases() -> Iterator[dict[str, str]]:
    """Fresh Airflow and Feast databases and roles, made by the stack's own init script, dropped after."""
    pg_admin().close()
    secrets = {k: v for k, v in generated_env().items()
               if k in ("AIRFLOW_DB_PASSWORD", "FEAST_DB_PASSWORD", "LEARN_DB_PASSWORD")}
    with make_stack_databases(secrets, uuid.uuid4().hex[:8], PG) as names:
        yield {**names, **secrets}


def _to_localhost(value: str) -> str:
    """A compose URL as seen from this machine: the services' hostnames become 127.0.0.1."""
    return re.sub(r"@(postgres|redis):", "@127.0.0.1:", value)


@pytest.mark.production
def test_airflow_metadata_db_migrates_on_postgresql(stack_databases: dict[str, str], tmp_path: Path) -> None:
    """`airflow db migrate` with the compose file's Airflow settings, into a database the init script made."""
    compose = load_compose()
    env = {**generated_env(), **stack_databases}
    af_env = {k: _to_localhost(v) for k, v in service_env(compose, "airflow-scheduler", env).items()
              if k.startswith("AIRFLOW__")}
    conn = af_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert conn.startswith(f"postgresql+psycopg2://{stack_databases['AIRFLOW_DB_USER']}:")
    assert conn.endswith(f"@127.0.0.1:5432/{stack_databases['AIRFLOW_DB_NAME']}")
    broker = af_env["AIRFLOW__CELERY__BROKER_URL"]
    assert re.fullmatch(r"redis://:[A-Za-z0-9_-]{16,}@127\.0\.0\.1:6379/1", broker)  # password, db 1
    redis = pytest.importorskip("redis")
    redis.Redis.from_url(re.sub(r"//:[^@]*@", "//", broker), socket_connect_timeout=3).ping()  # (no AUTH here)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    run_env.update(af_env, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(tmp_path / "dags"))
    airflow = [sys.executable, "-m", "airflow"]  # this environment's Airflow
    done = subprocess.run([*airflow, "db", "migrate"], env=run_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check = subprocess.run([*airflow, "db", "check"], env=run_env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]

    import psycopg2

    with psycopg2.connect(dbname=stack_databases["AIRFLOW_DB_NAME"], user=stack_databases["AIRFLOW_DB_USER"],
                          host=PG["host"], port=PG["port"]) as c, c.cursor() as cur:
        cur.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
        tables = dict(cur.fetchall())
    for table in ("alembic_version", "dag", "dag_run", "task_instance"):
        assert table in tables, f"{table} not created"
        assert tables[table] == stack_databases["AIRFLOW_DB_USER"]  # owned by the stack's Airflow role
    assert not (tmp_path / "airflow" / "airflow.db").exists()  # nothing went to SQLite


@pytest.mark.production
def test_feast_sql_registry_and_redis_online_store_with_the_profile(stack_databases: dict[str, str],
                                                                      tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379: {exc}")
    from learn_tasks.data import datasets as data
    from learn_tasks.online import features
    from learn_tasks.data import synth
    from learn_tasks import schema as S

    registry_url = (f"postgresql+psycopg2://{stack_databases['FEAST_DB_USER']}:{stack_databases['FEAST_DB_PASSWORD']}"
                    f"@127.0.0.1:5432/{stack_databases['FEAST_DB_NAME']}")
    log_url = (f"postgresql://{stack_databases['LEARN_DB_USER']}:{stack_databases['LEARN_DB_PASSWORD']}"
               f"@127.0.0.1:5432/{stack_databases['LEARN_DB_NAME']}")
    cfg = load_settings(files=[PROFILE], env={"LEARN_HOME": str(tmp_path / "home"),
                                              "LEARN_FEATURES__REDIS_URL": "127.0.0.1:6379,db=0",
                                              "LEARN_FEATURES__REGISTRY_URL": registry_url,
                                              "LEARN_EVENTLOG__URL": log_url},
                        overrides=["features.recent_items=5"])
    assert (cfg.features.online_store, cfg.features.registry) == ("redis", "sql")
    dataset = f"prod_{uuid.uuid4().hex[:8]}"  # its own Feast project: its own Redis keys and registry rows
    src = synth.write_seqrec(tmp_path / "src", synth.SynthSpec(n_users=40, n_items=60, seed=3))
    data.prepare_dataset(cfg, "seqrec", src, dataset)
    try:
        first = features.materialize_features(cfg, dataset)
        assert first["applied"] and first["materialized"]
        again = features.materialize_features(cfg, dataset)
        assert not again["rebuilt"] and not again["applied"] and not again["materialized"]
        inter = data.load_interactions(cfg, dataset)
        users = sorted(inter[S.USER_ID].unique())[:5]
        store = features.get_store(cfg, dataset)
        online = features.online_user_features(store, users, cfg.features.feature_service)
        for u in users:
            expected = inter[inter[S.USER_ID] == u].sort_values(S.EVENT_TIMESTAMP, kind="stable")[S.ITEM_ID].tolist()[-5:]
            assert list(online[u][S.RECENT_ITEM_IDS]) == expected
        assert any(k.startswith(features.project_name(dataset).encode()) or features.project_name(dataset).encode() in k
                   for k in redis.Redis(host="127.0.0.1", port=6379).scan_iter(count=1000))

        import psycopg2

        with psycopg2.connect(dbname=stack_databases["FEAST_DB_NAME"], user=stack_databases["FEAST_DB_USER"],
                              host=PG["host"], port=PG["port"]) as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM feature_views WHERE project_id = %s", (features.project_name(dataset),))
            assert cur.fetchone()[0] == len(features.TABLES)
    finally:
        features.teardown(cfg, dataset)


@pytest.mark.production
def test_event_log_in_the_stacks_database(stack_databases: dict[str, str], tmp_path: Path) -> None:
    """The event log with the compose URL, in the database and role the init script made for it."""
    from learn_tasks.data import eventlog
    from learn_tasks.data.eventlog_stores import open_log

    compose = load_compose()
    env = {**generated_env(), **stack_databases}
    url = _to_localhost(service_env(compose, "learn-api", env)["LEARN_EVENTLOG__URL"])
    assert url.startswith(f"postgresql://{stack_databases['LEARN_DB_USER']}:")
    cfg = load_settings(files=[PROFILE], env={"LEARN_HOME": str(tmp_path / "home"), "LEARN_EVENTLOG__URL": url})
    with open_log(cfg) as log:
        assert log.describe()["backend"] == "postgres" and env["LEARN_DB_PASSWORD"] not in str(log.describe())
        done = log.append_events("books", [eventlog.Event("e1", 1, 2, 3)])
        assert not done[0].duplicate and log.land("books", eventlog.EVENTS, "k").rows == 1
    import psycopg2

    with psycopg2.connect(dbname=stack_databases["LEARN_DB_NAME"], user=stack_databases["LEARN_DB_USER"],
                          host=PG["host"], port=PG["port"]) as c, c.cursor() as cur:
        cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'learn_events'")
        assert cur.fetchone()[0] == stack_databases["LEARN_DB_USER"]


@pytest.mark.production
def test_shared_state_in_the_stacks_database(stack_databases: dict[str, str], tmp_path: Path) -> None:
    """Promotions, releases and locks with the compose URL, in the database and role the init script made."""
    from learn_tasks import state

    compose = load_compose()
    env = {**generated_env(), **stack_databases}
    url = _to_localhost(service_env(compose, "airflow-worker", env)["LEARN_STATE__URL"])
    cfg = load_settings(files=[PROFILE], env={"LEARN_HOME": str(tmp_path / "home"), "LEARN_STATE__URL": url})
    store = state.open_state(cfg)
    try:
        assert store.describe()["backend"] == "postgres" and env["LEARN_DB_PASSWORD"] not in str(store.describe())
        assert store.promote("books", "run-1", "test") and store.promoted_run("books") == "run-1"
        with state.exclusive(cfg, cfg.paths.locks() / "books.lock") as held:
            assert held
    finally:
        state.close_stores()
    import psycopg2

    with psycopg2.connect(dbname=stack_databases["LEARN_DB_NAME"], user=stack_databases["LEARN_DB_USER"],
                          host=PG["host"], port=PG["port"]) as c, c.cursor() as cur:
        cur.execute("SELECT tablename, tableowner FROM pg_tables WHERE tablename LIKE 'learn_%'")
        owners = dict(cur.fetchall())
    for table in ("learn_state_schema", "learn_promoted", "learn_promotions", "learn_releases",
                  "learn_release_current"):
        assert owners.get(table) == stack_databases["LEARN_DB_USER"], table


@pytest.mark.integration
def test_index_code_on_a_milvus_server_uri_with_the_production_hnsw(tmp_path: Path) -> None:
    """The index code against a server URI (here a Milvus Lite server) with the profile's HNSW parameters."""
    from learn_tasks.online import index
    from learn_tasks.online import milvus_server

    home = tmp_path / "home"
    lite = load_settings(env={"LEARN_HOME": str(home)})
    server = milvus_server.start(lite, port=free_port())
    try:
        # The profile's index settings on a server URI; its shared state (PostgreSQL) is another test's subject.
        cfg = load_settings(files=[PROFILE], env={"LEARN_HOME": str(home), "LEARN_INDEX__URI": server["uri"]},
                            overrides=["index.recall_queries=64", "state.backend=files"])
        assert index.resolve_uri(cfg)[2] == "server" and cfg.index.index_type == "HNSW"
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((2000, 64)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = index.ItemRows(item_ids=np.arange(10, 2010, dtype=np.int64), vectors=vecs)
        out = index.build(cfg, "prod", "v1", rows)
        assert out["uri_kind"] == "server" and out["rows"] == 2000
        assert out["index_recall_at_10"] >= 0.95
        client = index.connect(cfg)
        hits = index.search(client, index.alias_name(cfg, "prod"), vecs[:3], k=5, search_params=cfg.index.search_params)
        assert [h[0]["item_id"] for h in hits] == [10, 11, 12]
        index.close(cfg)
    finally:
        milvus_server.stop(lite)
