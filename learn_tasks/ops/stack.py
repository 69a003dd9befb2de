"""The local stack: ``learn up`` / ``learn status`` / ``learn down``.

``learn up`` starts in the background, on loopback, everything a person needs to work with the project
through web pages, waits until each part answers its health check, and prints the URLs:

* **milvus**: the Milvus Lite server (:mod:`learn_tasks.online.milvus_server`). Milvus Lite lets one process
  own its data, and both the Airflow tasks and the service need the index, so they all use its URI.
* **airflow**: Airflow 3 in standalone style (SQLite metadata DB, LocalExecutor, simple auth manager)
  with ``AIRFLOW_HOME=$LEARN_HOME/airflow`` (the same home and DB as ``learn run``) and the repository's
  ``dags/``: ``api-server`` (UI, REST and execution API), ``scheduler`` and ``dag-processor`` (and
  ``triggerer`` when ``stack.airflow_triggerer``), with parallelism ``stack.airflow_parallelism``, and the
  pool that serialises the tasks writing the Milvus collection (created when missing).
  The components are started one by one rather than through ``airflow standalone`` because its
  scheduler and triggerer open log servers on every network interface at fixed ports (8793/8794); with
  the LocalExecutor the UI reads task logs from disk, so those servers are skipped, nothing listens
  beyond loopback, and two stacks (say, an operator's and a test's) can run side by side. The login is
  ``admin``; Airflow's simple auth manager generates the password into
  ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated`` (:func:`airflow_password_file`).
  Scheduled runs are off unless ``stack.airflow_schedules``: on a workstation a run starts when a
  person triggers it.
* **service**: the recommendation service (``learn serve``, :func:`learn_tasks.online.service.create_app`, with
  the explorer at ``/explorer``), which answers before any model exists (popular items; ``/health`` says
  ``degraded``, ``no model yet`` and why) and swaps in each new release (a model indexed and checked by
  ``load_milvus``), so a pipeline run triggered in the Airflow UI shows up in the explorer without a restart. Writes (``POST /items``) need the token in
  ``$LEARN_API_TOKEN``, or else the one ``learn up`` generates into ``$LEARN_HOME/run/api_token``.
* **evidently**: the Evidently UI over the monitoring workspace ``$LEARN_HOME/evidently``.

State: one JSON pid file per process under ``$LEARN_HOME/run/`` (:mod:`learn_tasks.ops.supervisor`).
``learn down`` stops exactly those process groups (SIGTERM, then SIGKILL after a grace period) and
removes the files; a Milvus server that was already running before
``learn up`` is left alone. A second ``learn up`` while everything runs is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from learn_tasks.config import Settings
from learn_tasks.monitoring import dashboard
from learn_tasks.online import milvus_server
from learn_tasks.orchestration.airflow_env import airflow_env as embedded_airflow_env
from learn_tasks.orchestration.airflow_env import is_migrated, mark_migrated
from learn_tasks.orchestration.assets import MILVUS_POOL, MILVUS_POOL_DOC
from learn_tasks.ops.supervisor import (log_file, members, open_log, pid_file, private_run_dir, read_record, run_dir,
                                        spawn, stop_record, stop_records, tail)
from learn_tasks.processes import alive, http_json, port_open
from learn_tasks.storage import exclusive, write_json

COMPONENTS = ("milvus", "airflow", "service", "evidently")  # start order; `down` stops in reverse
PASSWORD_FILE_ENV = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"  # Airflow's default, under AIRFLOW_HOME
TOKEN_ENV_DEFAULT = "LEARN_API_TOKEN"


class StackError(RuntimeError):
    """The stack could not be started (a port in use, a component that exited or never became healthy)."""


# ==================================================================================================
# Paths, addresses, environments
# ==================================================================================================
def home(cfg: Settings) -> Path:
    """The local LEARN_HOME (the working directory when LEARN_HOME is a URL)."""
    return cfg.paths.home.resolve()


def token_file(cfg: Settings) -> Path:
    return run_dir(cfg) / "api_token"


def airflow_home(cfg: Settings) -> Path:
    return cfg.paths.airflow().resolve()


def airflow_password_file(cfg: Settings, env: dict[str, str] | None = None) -> Path:
    """Where Airflow's simple auth manager writes the generated ``admin`` password (JSON ``{user: pw}``).

    ``[core] simple_auth_manager_passwords_file`` when set, else ``$AIRFLOW_HOME/<PASSWORD_FILE_NAME>``.
    """
    env = os.environ if env is None else env
    configured = env.get(PASSWORD_FILE_ENV)
    return Path(configured) if configured else airflow_home(cfg) / PASSWORD_FILE_NAME


def airflow_processes(cfg: Settings) -> list[str]:
    names = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
    return names + (["airflow-triggerer"] if cfg.stack.airflow_triggerer else [])


def urls(cfg: Settings) -> dict[str, str]:
    """The four addresses ``learn up --json`` prints (from the settings; ports are configurable)."""
    return {
        "airflow": f"http://{cfg.stack.airflow_host}:{cfg.stack.airflow_port}",
        "service": f"http://{cfg.serve.host}:{cfg.serve.port}",
        "evidently": f"http://{cfg.monitor.ui_host}:{cfg.monitor.ui_port}",
        "milvus": f"http://127.0.0.1:{cfg.index.server_port}",
    }


def served_dataset(cfg: Settings) -> str:
    return cfg.serve.dataset or cfg.pipeline.dataset


def base_env(cfg: Settings) -> dict[str, str]:
    """The environment every component gets: this one (settings overrides included), offline, absolute home."""
    env = dict(os.environ)
    env["LEARN_HOME"] = cfg.remote_home or str(home(cfg))
    if cfg.remote_home:  # a URL home: every component works in this same local directory
        env["LEARN_STORAGE__CACHE_DIR"] = str(home(cfg))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("DO_NOT_TRACK", "1")  # Evidently: no usage reporting
    env["PYTHONUNBUFFERED"] = "1"
    return env


def airflow_env(cfg: Settings, env: dict[str, str] | None = None) -> dict[str, str]:
    """Airflow on loopback with the project's DAGs, sized for a small machine (see the module docstring)."""
    env = dict(env if env is not None else base_env(cfg))
    ahome, st = airflow_home(cfg), cfg.stack
    api = f"http://{st.airflow_host}:{st.airflow_port}"
    # The same home, metadata DB, DAGs and logs as `learn run`, so runs from either show up in the UI.
    env.update(embedded_airflow_env(ahome, verbose=True))
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(st.airflow_parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(st.airflow_parallelism),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API__HOST": st.airflow_host,
        "AIRFLOW__API__PORT": str(st.airflow_port),
        "AIRFLOW__API__WORKERS": "1",
        # Task processes report to the execution API of *this* api-server (default: localhost:8080).
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(st.airflow_schedules),
        # With schedules off nothing starts by itself, so the DAGs can be born unpaused: a run triggered
        # from the UI or the REST API starts at once.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(st.airflow_schedules),
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
    })
    return env


def airflow_commands(cfg: Settings) -> dict[str, list[str]]:
    airflow = str(Path(sys.executable).parent / "airflow")
    cmds = {"airflow-api-server": [airflow, "api-server"],
            "airflow-scheduler": [airflow, "scheduler", "--skip-serve-logs"],
            "airflow-dag-processor": [airflow, "dag-processor"]}
    if cfg.stack.airflow_triggerer:
        cmds["airflow-triggerer"] = [airflow, "triggerer", "--skip-serve-logs"]
    return cmds


def migrate_airflow_db(cfg: Settings, env: dict[str, str], timeout_s: float = 600.0) -> bool:
    """Create or upgrade the SQLite metadata DB (skipped when this Airflow version already did it)."""
    ahome = airflow_home(cfg)
    ahome.mkdir(parents=True, exist_ok=True)
    if is_migrated(ahome):  # the same stamp `learn run` keeps
        return False
    private_run_dir(cfg)
    log_path = log_file(cfg, "airflow-db-migrate")
    with open_log(log_path) as out:
        done = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if done.returncode != 0:
        raise StackError(f"`airflow db migrate` failed (exit {done.returncode}); log {log_path}:\n{tail(log_path)}")
    mark_migrated(ahome)
    return True


def service_command(cfg: Settings, dataset: str) -> list[str]:
    return [sys.executable, "-m", "learn_tasks.cli", "serve", "--dataset", dataset,
            "--host", cfg.serve.host, "--port", str(cfg.serve.port)]


def ensure_airflow_pool(cfg: Settings, env: dict[str, str], timeout_s: float = 120.0) -> None:
    """Create the Milvus writers' pool (one slot) unless it exists; an operator's own size is kept."""
    airflow = str(Path(sys.executable).parent / "airflow")
    got = subprocess.run([airflow, "pools", "get", MILVUS_POOL, "--output", "json"], env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if got.returncode == 0:
        return
    made = subprocess.run([airflow, "pools", "set", MILVUS_POOL, "1", MILVUS_POOL_DOC], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if made.returncode != 0:
        raise StackError(f"`airflow pools set {MILVUS_POOL}` failed (exit {made.returncode}): "
                         f"{(made.stderr or made.stdout)[-2000:]}")


def api_token(cfg: Settings) -> tuple[str, str]:
    """(token, where it comes from): ``$LEARN_API_TOKEN`` if set, else ``run/api_token`` (made once, mode 600)."""
    env_name = cfg.serve.token_env or TOKEN_ENV_DEFAULT
    if os.environ.get(env_name):
        return os.environ[env_name], f"${env_name}"
    path = token_file(cfg)
    if not path.exists():
        private_run_dir(cfg)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip(), str(path)


def check_component(cfg: Settings, name: str) -> tuple[bool, str]:
    """(healthy, detail) of one component from the outside (its HTTP health endpoint or port)."""
    u = urls(cfg)
    if name == "milvus":
        st = milvus_server.status(cfg)
        return bool(st.get("running")), "listening" if st.get("running") else "not running"
    if name == "airflow":
        code, body = http_json(f"{u['airflow']}/api/v2/monitor/health")
        if code != 200 or not isinstance(body, dict):
            return False, "api-server not answering yet" if code == 0 else f"health HTTP {code}"
        wanted = ["metadatabase", "scheduler", "dag_processor"] + (["triggerer"] if cfg.stack.airflow_triggerer else [])
        bad = [k for k in wanted if (body.get(k) or {}).get("status") != "healthy"]
        return (not bad), ("healthy" if not bad else "waiting for " + ", ".join(bad))
    if name == "service":
        code, body = http_json(f"{u['service']}/health")
        if code == 0 or not isinstance(body, dict):
            return False, "not answering yet"
        status = body.get("status")
        if status == "ok":
            return True, f"serving model {((body.get('checks') or {}).get('model') or {}).get('version')}"
        if status == "degraded" and code == 200:  # up, no release to serve yet: popular items answer
            return True, f"up, {body.get('reason')}"
        return False, f"{status}: {body.get('reason') or body.get('checks')}"
    if name == "evidently":
        code, _ = http_json(f"{u['evidently']}/api/version")
        return code == 200, "healthy" if code == 200 else "not answering yet"
    raise ValueError(f"unknown component {name!r}")


def component_processes(cfg: Settings, name: str) -> list[str]:
    return {"milvus": ["milvus"], "airflow": airflow_processes(cfg), "service": ["service"],
            "evidently": ["evidently"]}[name]


def component_running(cfg: Settings, name: str) -> bool:
    """Every process of the component that `learn up` recorded is alive (Milvus: also one started elsewhere)."""
    if name == "milvus":
        return bool(milvus_server.status(cfg).get("running"))
    recs = [read_record(cfg, p) for p in component_processes(cfg, name)]
    return all(r is not None and alive(r) is not None for r in recs)


@contextlib.contextmanager
def _lock(cfg: Settings) -> Iterator[None]:
    """One `learn up` / `learn down` at a time per LEARN_HOME.

    A file lock whatever ``state.backend`` says: it guards this host's processes and their pid records
    (``run/``), which another host's `learn up` has nothing to do with."""
    with exclusive(private_run_dir(cfg) / "stack.lock", wait=False) as locked:
        if not locked:
            raise StackError(f"another `learn up` or `learn down` is working on {home(cfg)}")
        yield


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(COMPONENTS)
    unknown = sorted(set(only) - set(COMPONENTS))
    if unknown:
        raise StackError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    chosen = set(only)
    if chosen & {"airflow", "service"}:
        chosen.add("milvus")  # both use the index; without the server they would fight over the Lite data
    return [c for c in COMPONENTS if c in chosen]


def _check_port(host: str, port: int, what: str, key: str) -> None:
    if port_open(host, port):
        raise StackError(f"{what}: port {port} on {host} is already in use by another program; "
                         f"choose another with `learn --set {key}=PORT up`")


def _start_component(cfg: Settings, name: str, env: dict[str, str], dataset: str, token: str,
                     token_source: str | None = None) -> list[str]:
    """Start one component's processes; returns the pid-file names written."""
    u = urls(cfg)
    if name == "milvus":
        try:
            st = milvus_server.start(cfg, wait_s=cfg.stack.wait_s)
        except milvus_server.ServerError as exc:
            raise StackError(f"milvus: {exc}") from exc
        if not st.get("started"):
            return []  # it was already running: not ours to stop
        write_json({"name": "milvus", "pid": st["pid"], "pgid": st["pid"], "create_time": st["create_time"],
                    "argv": ["milvus-lite server"], "url": st["uri"], "log": st.get("log"),
                    "started_at": st.get("started_at"), "managed_by": "learn_tasks.online.milvus_server"},
                   pid_file(cfg, "milvus"))
        return ["milvus"]
    if name == "airflow":
        st = cfg.stack
        _check_port(st.airflow_host, st.airflow_port, "airflow", "stack.airflow_port")
        aenv = airflow_env(cfg, env)
        migrate_airflow_db(cfg, aenv, timeout_s=max(cfg.stack.wait_s, 120.0))
        ensure_airflow_pool(cfg, aenv, timeout_s=max(cfg.stack.wait_s, 120.0))
        # The api-server writes the generated admin password into this file; create it empty and private
        # first, so the password is never readable by others, not even for a moment.
        pw = airflow_password_file(cfg)
        if not pw.exists():
            pw.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            with contextlib.suppress(OSError):
                pw.chmod(0o600)
        started = []
        for proc_name, argv in airflow_commands(cfg).items():
            spawn(cfg, proc_name, argv, aenv, url=u["airflow"] if proc_name == "airflow-api-server" else None)
            started.append(proc_name)
        return started
    if name == "service":
        _check_port(cfg.serve.host, cfg.serve.port, "service", "serve.port")
        senv = {**env, (cfg.serve.token_env or TOKEN_ENV_DEFAULT): token}
        rec = spawn(cfg, "service", service_command(cfg, dataset), senv, url=u["service"])
        write_json({**rec, "dataset": dataset, "token_source": token_source}, pid_file(cfg, "service"))
        return ["service"]
    if name == "evidently":
        _check_port(cfg.monitor.ui_host, cfg.monitor.ui_port, "evidently", "monitor.ui_port")
        cfg.paths.evidently().resolve().mkdir(parents=True, exist_ok=True)
        spawn(cfg, "evidently", dashboard.ui_command(cfg), env, url=u["evidently"])
        return ["evidently"]
    raise ValueError(name)


def _wait_healthy(cfg: Settings, names: Sequence[str], timeout_s: float,
                  progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Poll until every component is healthy; raise with the log tail when one exits or time runs out."""
    pending = list(names)
    details: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        for name in list(pending):
            for proc_name in component_processes(cfg, name):
                rec = read_record(cfg, proc_name)
                if rec is not None and alive(rec) is None:
                    raise StackError(f"{proc_name} exited while starting; log {rec.get('log')}:\n"
                                     f"{tail(rec.get('log') or '')}")
            ok, detail = check_component(cfg, name)
            details[name] = detail
            if ok:
                pending.remove(name)
                if progress:
                    progress(f"{name}: {detail}")
        if not pending:
            break
        if time.monotonic() > deadline:
            logs = "; ".join(f"{n}: {details.get(n)} (log {log_file(cfg, component_processes(cfg, n)[0])})"
                             for n in pending)
            raise StackError(f"not healthy within {timeout_s:.0f} s: {logs}")
        time.sleep(1.0)
    return details


def up(cfg: Settings, dataset: str | None = None, only: Sequence[str] | None = None,
       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start what is not running yet, wait until all of it is healthy, and say where everything is.

    Returns the four addresses (``airflow``, ``service``, ``evidently``, ``milvus``; ``None`` for a
    component left out with ``only``) plus ``already_running``, ``started`` (pid-file names), ``health``,
    ``airflow_password_file``, ``api_token_source`` and ``run_dir``.
    """
    names = _selected(only)
    dataset = dataset or served_dataset(cfg)
    say = progress or (lambda _msg: None)
    with _lock(cfg):
        running = {n: component_running(cfg, n) for n in names}
        to_start = [n for n in names if not running[n]]
        # Leftovers of a component that is half up (one Airflow process died): stop them before restarting.
        for n in to_start:
            if n != "milvus":
                for p in component_processes(cfg, n):
                    rec = read_record(cfg, p)
                    if rec is not None:
                        stop_record(rec)
                        pid_file(cfg, p).unlink(missing_ok=True)
        env = base_env(cfg)
        # Only a service started now gets (and records) a token; a running one keeps the one it has.
        token, token_source = api_token(cfg) if "service" in to_start else (None, None)
        started: list[str] = []
        try:
            for n in to_start:
                say(f"starting {n} ...")
                started += _start_component(cfg, n, env, dataset, token or "", token_source)
            health = _wait_healthy(cfg, names, cfg.stack.wait_s, say)
        except BaseException:
            for p in reversed(started):  # leave nothing half-started behind
                _stop_name(cfg, p)
            raise
    u = urls(cfg)
    if "milvus" in names:
        u["milvus"] = milvus_server.status(cfg).get("uri") or u["milvus"]
    if "service" in names and token_source is None:  # already running: what it was started with
        svc = read_record(cfg, "service") or {}
        token_source, dataset = svc.get("token_source"), svc.get("dataset") or dataset
    out: dict[str, Any] = {k: (v if k in names else None) for k, v in u.items()}
    out.update({
        "already_running": not to_start, "started": started, "health": health, "dataset": dataset,
        "airflow_user": "admin" if "airflow" in names else None,
        "airflow_password_file": str(airflow_password_file(cfg)) if "airflow" in names else None,
        "api_token_source": token_source, "run_dir": str(run_dir(cfg)),
        "explorer": f"{u['service']}/explorer" if "service" in names else None,
    })
    return out


def _stop_milvus(cfg: Settings, rec: dict[str, Any]) -> bool:
    stopped = False
    if milvus_server.status(cfg).get("pid") == rec.get("pid"):  # still the server this stack started
        stopped = bool(milvus_server.stop(cfg).get("stopped"))  # SIGINT: it closes its data cleanly
    return stop_record(rec) or stopped  # anything of its group left over


def _stop_name(cfg: Settings, name: str) -> bool:
    rec = read_record(cfg, name)
    if rec is None:
        return False
    stopped = _stop_milvus(cfg, rec) if name == "milvus" else stop_record(rec)
    pid_file(cfg, name).unlink(missing_ok=True)
    return stopped


def down(cfg: Settings, grace_s: float = 30.0) -> dict[str, Any]:
    """Stop exactly the processes `learn up` started (pid files under ``run/``).

    Everything but Milvus is stopped together (Airflow's components take seconds each to shut down);
    Milvus last, once nothing uses it.
    """
    with _lock(cfg):
        names = [p for c in COMPONENTS for p in component_processes(cfg, c)]
        names += sorted(p.stem for p in run_dir(cfg).glob("*.json") if p.stem not in names)
        recs = {n: r for n in names if (r := read_record(cfg, n)) is not None}
        running = {n for n, r in recs.items() if members(r)}
        stop_records([r for n, r in recs.items() if n != "milvus"], grace_s)
        if "milvus" in recs:
            _stop_milvus(cfg, recs["milvus"])
        for n in recs:
            pid_file(cfg, n).unlink(missing_ok=True)
    order = [n for n in reversed(names) if n in recs]
    return {"stopped": [n for n in order if n in running], "not_running": [n for n in order if n not in running],
            "run_dir": str(run_dir(cfg))}


def status(cfg: Settings) -> dict[str, Any]:
    """What runs: per component, its processes (pid, alive), URL, health and log."""
    u = urls(cfg)
    comps: dict[str, Any] = {}
    for name in COMPONENTS:
        procs = {}
        for p in component_processes(cfg, name):
            rec = read_record(cfg, p)
            procs[p] = None if rec is None else {"pid": rec["pid"], "alive": alive(rec) is not None,
                                                 "log": rec.get("log")}
        running = component_running(cfg, name)
        healthy, detail = check_component(cfg, name) if running else (False, "not running")
        if name == "milvus":
            ms = milvus_server.status(cfg)
            u["milvus"] = ms.get("uri") or u["milvus"]
            detail += "" if procs["milvus"] or not running else " (started outside `learn up`)"
        comps[name] = {"running": running, "healthy": healthy, "detail": detail, "url": u[name], "processes": procs}
    return {"running": all(c["running"] for c in comps.values()),
            "any_running": any(c["running"] for c in comps.values()), "components": comps,
            "airflow_password_file": str(airflow_password_file(cfg)), "run_dir": str(run_dir(cfg))}
