"""The local stack: ``learn up`` / ``learn status`` / ``learn down``.

``learn up`` starts in the background, on loopback, everything a person needs to work with the project
through web pages, waits until each part answers its health check, and prints the URLs:

* **milvus**: the Milvus Lite server (:mod:`learn_tasks.online.milvus_lite`). Milvus Lite lets one process
  own its data, and both the Airflow tasks and the service need the index, so they all use its URI.
* **airflow**: Airflow 3 in standalone style (SQLite metadata DB, LocalExecutor, simple auth manager)
  with ``AIRFLOW_HOME=$LEARN_HOME/airflow`` (the same home and DB as ``learn run``) and the repository's
  ``dags/``: ``api-server`` (UI, REST and execution API), ``scheduler`` and ``dag-processor`` (and
  ``triggerer`` when ``stack.airflow_triggerer``), with parallelism ``stack.airflow_parallelism``.
  The components are started one by one rather than through ``airflow standalone`` because its
  scheduler and triggerer open log servers on every network interface at fixed ports (8793/8794); with
  the LocalExecutor the UI reads task logs from disk, so those servers are skipped, nothing listens
  beyond loopback, and two stacks (say, an operator's and a test's) can run side by side. The login is
  ``admin``; Airflow's simple auth manager generates the password into
  ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated`` (:func:`airflow_password_file`).
  Scheduled runs are off unless ``stack.airflow_schedules``: on a workstation a run starts when a
  person triggers it.
* **service**: the recommendation service (:func:`learn_tasks.online.service.create_app`, with the explorer at
  ``/explorer``) inside :class:`LiveService`, which answers before any model exists (``/health`` says
  what is missing) and swaps in each newly promoted *and* indexed model, so a pipeline run triggered in
  the Airflow UI shows up in the explorer without a restart. Writes (``POST /items``) need the token in
  ``$LEARN_API_TOKEN``, or else the one ``learn up`` generates into ``$LEARN_HOME/run/api_token``.
* **evidently**: the Evidently UI over the monitoring workspace ``$LEARN_HOME/evidently``.

State: one JSON pid file per process under ``$LEARN_HOME/run/`` (pid, process start time, process
group, command, URL, log file ``$LEARN_HOME/run/<name>.log``). Each process starts in a session of its
own, so its group holds what it spawned (Airflow's executor workers and task processes); the start time
guards against a recycled pid. ``learn down`` stops exactly those process groups (SIGTERM, then SIGKILL
after a grace period) and removes the files; a Milvus server that was already running before
``learn up`` is left alone. A second ``learn up`` while everything runs is a no-op.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import psutil

from learn_tasks.config import REPO_ROOT, Settings
from learn_tasks.storage import read_json, write_json, write_text

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("learn.stack")

COMPONENTS = ("milvus", "airflow", "service", "evidently")  # start order; `down` stops in reverse
PASSWORD_FILE_ENV = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"  # Airflow's default, under AIRFLOW_HOME
TOKEN_ENV_DEFAULT = "LEARN_API_TOKEN"
DAGS_FOLDER = REPO_ROOT / "dags"


class StackError(RuntimeError):
    """The stack could not be started (a port in use, a component that exited or never became healthy)."""


# ==================================================================================================
# Paths
# ==================================================================================================
def home(cfg: Settings) -> Path:
    return Path(cfg.home).resolve()


def run_dir(cfg: Settings) -> Path:
    return home(cfg) / "run"


def pid_file(cfg: Settings, name: str) -> Path:
    return run_dir(cfg) / f"{name}.json"


def log_file(cfg: Settings, name: str) -> Path:
    return run_dir(cfg) / f"{name}.log"


def token_file(cfg: Settings) -> Path:
    return run_dir(cfg) / "api_token"


def airflow_home(cfg: Settings) -> Path:
    return home(cfg) / "airflow"


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


# ==================================================================================================
# Processes: start, identify, stop
# ==================================================================================================
def _alive(rec: dict[str, Any]) -> psutil.Process | None:
    """The process of a pid record, or None when it is gone (or the pid now names another process)."""
    try:
        proc = psutil.Process(int(rec["pid"]))
        if abs(proc.create_time() - float(rec["create_time"])) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None


def _group(rec: dict[str, Any]) -> list[psutil.Process]:
    """Live members of the record's process group that started no earlier than the recorded process."""
    pgid, born = int(rec.get("pgid") or rec["pid"]), float(rec["create_time"]) - 1.0
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.create_time() >= born and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def members(rec: dict[str, Any]) -> list[psutil.Process]:
    """Everything a recorded process stands for: itself, its descendants and the rest of its group."""
    found: dict[int, psutil.Process] = {}
    leader = _alive(rec)
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                found[child.pid] = child
    for proc in _group(rec):
        found.setdefault(proc.pid, proc)
    return list(found.values())


def private_run_dir(cfg: Settings) -> Path:
    """``run/``, readable by its owner only: logs hold secrets (Airflow prints the generated password)."""
    path = run_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def open_log(path: Path):
    """Append to a log file that only its owner can read."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def spawn(cfg: Settings, name: str, argv: Sequence[str], env: dict[str, str], url: str | None = None,
          cwd: str | Path | None = None) -> dict[str, Any]:
    """Start ``argv`` in a new session (its own process group), log to ``run/<name>.log``, write its pid file."""
    private_run_dir(cfg)
    log_path = log_file(cfg, name)
    with open_log(log_path) as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} learn up: {' '.join(argv)}\n".encode())
        out.flush()
        # A new session: the process outlives `learn up`, ignores its terminal's ^C, and its group
        # collects whatever it spawns, which is what `learn down` stops.
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd) if cwd else None, start_new_session=True)
    rec = {"name": name, "pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
           "argv": list(argv), "url": url, "log": str(log_path), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(rec, pid_file(cfg, name))
    return rec


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running: same pid *and* start
    except psutil.Error:
        return False


def stop_records(recs: Sequence[dict[str, Any]], grace_s: float = 30.0) -> bool:
    """Stop recorded processes with everything they spawned: SIGTERM to each recorded process (they stop
    their own workers), then SIGTERM to whatever is left, then SIGKILL; all records at once.

    Descendants are tracked from the first look on, so task processes that left the group (Airflow puts
    each task in a group of its own) and were re-parented when their parent exited are still stopped.
    Processes that are not the recorded one (a recycled pid) or started before it are never signalled.
    Returns whether anything was running.
    """
    tracked: dict[int, psutil.Process] = {}

    def live() -> list[psutil.Process]:
        for rec in recs:
            for proc in members(rec):
                tracked.setdefault(proc.pid, proc)
        return [p for p in tracked.values() if _running(p)]

    if not live():
        return False
    leaders = [p for p in (_alive(r) for r in recs) if p is not None]
    for sig, targets, wait_s in ((signal.SIGTERM, leaders or None, grace_s), (signal.SIGTERM, None, 5.0),
                                 (signal.SIGKILL, None, 5.0)):
        for proc in targets if targets is not None else live():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and live():
            if sig == signal.SIGTERM and targets is leaders and not any(_running(p) for p in leaders):
                break  # the recorded processes are gone but left something behind: on to the next step
            time.sleep(0.2)
        if not live():
            break
    return True


def stop_record(rec: dict[str, Any], grace_s: float = 30.0) -> bool:
    """:func:`stop_records` of one record."""
    return stop_records([rec], grace_s)


def _read_record(cfg: Settings, name: str) -> dict[str, Any] | None:
    path = pid_file(cfg, name)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def http_json(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we built
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


# ==================================================================================================
# Environments and commands
# ==================================================================================================
def base_env(cfg: Settings) -> dict[str, str]:
    """The environment every component gets: this one (settings overrides included), offline, absolute home."""
    env = dict(os.environ)
    env["LEARN_HOME"] = str(home(cfg))
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
    env.update({
        # The same home, metadata DB and logs as `learn run` (learn_tasks.orchestration.pipeline), so runs from either
        # show up in the UI.
        "AIRFLOW_HOME": str(ahome),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{ahome / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(ahome / "logs"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
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


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow-core")


def migrate_airflow_db(cfg: Settings, env: dict[str, str], timeout_s: float = 600.0) -> bool:
    """Create or upgrade the SQLite metadata DB (skipped when this Airflow version already did it)."""
    ahome = airflow_home(cfg)
    ahome.mkdir(parents=True, exist_ok=True)
    stamp = ahome / ".migrated"  # the same stamp `learn run` keeps (learn_tasks.orchestration.pipeline.configure_airflow)
    version = _airflow_version()
    if (ahome / "airflow.db").exists() and stamp.exists() and stamp.read_text().strip() == version:
        return False
    private_run_dir(cfg)
    log_path = log_file(cfg, "airflow-db-migrate")
    with open_log(log_path) as out:
        done = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if done.returncode != 0:
        raise StackError(f"`airflow db migrate` failed (exit {done.returncode}); log {log_path}:\n{_tail(log_path)}")
    write_text(version + "\n", stamp)
    return True


def service_command(cfg: Settings, dataset: str) -> list[str]:
    return [sys.executable, "-m", "learn_tasks.ops.stack", "service", "--dataset", dataset,
            "--host", cfg.serve.host, "--port", str(cfg.serve.port)]


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


# ==================================================================================================
# Health
# ==================================================================================================
def check_component(cfg: Settings, name: str) -> tuple[bool, str]:
    """(healthy, detail) of one component from the outside (its HTTP health endpoint or port)."""
    u = urls(cfg)
    if name == "milvus":
        from learn_tasks.online import milvus_lite as milvus_server

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
        if status == "waiting":  # up, no model to serve yet: the explorer says so too
            return True, f"up, no model yet: {body.get('reason')}"
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
        from learn_tasks.online import milvus_lite as milvus_server

        return bool(milvus_server.status(cfg).get("running"))
    recs = [_read_record(cfg, p) for p in component_processes(cfg, name)]
    return all(r is not None and _alive(r) is not None for r in recs)


# ==================================================================================================
# up / status / down
# ==================================================================================================
@contextlib.contextmanager
def _lock(cfg: Settings) -> Iterator[None]:
    """One `learn up` / `learn down` at a time per LEARN_HOME."""
    with open(private_run_dir(cfg) / "stack.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `learn up` or `learn down` is working on {home(cfg)}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
        from learn_tasks.online import milvus_lite as milvus_server

        try:
            st = milvus_server.start(cfg, wait_s=cfg.stack.wait_s)
        except milvus_server.ServerError as exc:
            raise StackError(f"milvus: {exc}") from exc
        if not st.get("started"):
            return []  # it was already running: not ours to stop
        write_json({"name": "milvus", "pid": st["pid"], "pgid": st["pid"], "create_time": st["create_time"],
                    "argv": ["milvus-lite server"], "url": st["uri"], "log": st.get("log"),
                    "started_at": st.get("started_at"), "managed_by": "learn_tasks.online.milvus_lite"},
                   pid_file(cfg, "milvus"))
        return ["milvus"]
    if name == "airflow":
        st = cfg.stack
        _check_port(st.airflow_host, st.airflow_port, "airflow", "stack.airflow_port")
        aenv = airflow_env(cfg, env)
        migrate_airflow_db(cfg, aenv, timeout_s=max(cfg.stack.wait_s, 120.0))
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
        from learn_tasks.monitoring import monitor

        _check_port(cfg.monitor.ui_host, cfg.monitor.ui_port, "evidently", "monitor.ui_port")
        (home(cfg) / "evidently").mkdir(parents=True, exist_ok=True)
        spawn(cfg, "evidently", monitor.ui_command(cfg), env, url=u["evidently"])
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
                rec = _read_record(cfg, proc_name)
                if rec is not None and _alive(rec) is None:
                    raise StackError(f"{proc_name} exited while starting; log {rec.get('log')}:\n"
                                     f"{_tail(rec.get('log') or '')}")
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
                    rec = _read_record(cfg, p)
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
        from learn_tasks.online import milvus_lite as milvus_server

        u["milvus"] = milvus_server.status(cfg).get("uri") or u["milvus"]
    if "service" in names and token_source is None:  # already running: what it was started with
        svc = _read_record(cfg, "service") or {}
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
    from learn_tasks.online import milvus_lite as milvus_server

    stopped = False
    if milvus_server.status(cfg).get("pid") == rec.get("pid"):  # still the server this stack started
        stopped = bool(milvus_server.stop(cfg).get("stopped"))  # SIGINT: it closes its data cleanly
    return stop_record(rec) or stopped  # anything of its group left over


def _stop_name(cfg: Settings, name: str) -> bool:
    rec = _read_record(cfg, name)
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
        recs = {n: r for n in names if (r := _read_record(cfg, n)) is not None}
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
            rec = _read_record(cfg, p)
            procs[p] = None if rec is None else {"pid": rec["pid"], "alive": _alive(rec) is not None,
                                                 "log": rec.get("log")}
        running = component_running(cfg, name)
        healthy, detail = check_component(cfg, name) if running else (False, "not running")
        if name == "milvus":
            from learn_tasks.online import milvus_lite as milvus_server

            ms = milvus_server.status(cfg)
            u["milvus"] = ms.get("uri") or u["milvus"]
            detail += "" if procs["milvus"] or not running else " (started outside `learn up`)"
        comps[name] = {"running": running, "healthy": healthy, "detail": detail, "url": u[name], "processes": procs}
    return {"running": all(c["running"] for c in comps.values()),
            "any_running": any(c["running"] for c in comps.values()), "components": comps,
            "airflow_password_file": str(airflow_password_file(cfg)), "run_dir": str(run_dir(cfg))}


# ==================================================================================================
# The service process: serve.create_app behind a wrapper that waits for, and swaps in, models
# ==================================================================================================
class LiveService:
    """An ASGI app that serves the promoted model of ``dataset`` and follows the pipeline.

    The service proper (:func:`learn_tasks.online.service.create_app`) pins one model version and its index
    collection at start-up and refuses to start without them. Here a watcher thread looks every
    ``stack.reload_poll_s`` for a promoted model whose collection the alias points at (so the pipeline
    finished ``load_milvus``), builds a new app for it next to the running one and swaps it in; requests
    in flight finish on the old one. Until the first model exists, a small placeholder app answers:
    ``/health`` (503, ``status: waiting`` with the reason), the explorer page (it shows the reason), and
    503 with the reason for everything else.
    """

    def __init__(self, cfg: Settings, dataset: str, build: Callable[[Settings, str], "FastAPI"] | None = None):
        self.cfg, self.dataset = cfg, dataset
        self._build = build or _build_service_app
        self.current: tuple[str, "FastAPI"] | None = None  # (model version, app)
        self.status = "loading"
        self.reason: str | None = "looking for a promoted model"
        self.failures: dict[str, tuple[float, str]] = {}  # version -> (when, error) of a failed build
        self.swaps = 0
        self.checked_at: float | None = None
        self.placeholder = _placeholder_app(self)
        self._check_lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------ watching
    def target(self) -> tuple[str | None, str | None]:
        """(version to serve, None) or (None, why nothing new can be served yet)."""
        from learn_tasks.online import index
        from learn_tasks.pch import registry

        run = registry.promoted(self.cfg, self.dataset)
        if run is None:
            return None, (f"no promoted model for dataset {self.dataset!r} yet: trigger learn_pipeline "
                          f"(dataset {self.dataset}) in Airflow")
        try:
            live = index.current(self.cfg, self.dataset, index.connect(self.cfg))
        except Exception as exc:  # noqa: BLE001 - Milvus down: keep serving what we have
            return None, f"cannot read the index alias: {exc}"
        if live != index.collection_name(self.dataset, run.name):
            return None, f"promoted model {run.name} is not indexed yet (the alias points at {live})"
        return run.name, None

    def check(self) -> str:
        """One look: swap in a newer servable model if there is one. Returns the status."""
        with self._check_lock:
            self.checked_at = time.time()
            version, why = self.target()
            if version is None or (self.current is not None and self.current[0] == version):
                if self.current is None:
                    self.status, self.reason = "waiting", why
                return self.status
            failed = self.failures.get(version)
            if failed is not None and time.time() - failed[0] < 60.0:  # do not rebuild a broken model in a loop
                return self.status
            if self.current is None:
                self.status, self.reason = "loading", f"loading model {version}"
            t0 = time.perf_counter()
            try:
                app = self._build(self.cfg, self.dataset)
            except Exception as exc:  # noqa: BLE001 - reported on /health and the explorer, retried later
                msg = f"{type(exc).__name__}: {exc}"
                self.failures[version] = (time.time(), msg)
                log.error("cannot serve model %s: %s", version, msg)
                if self.current is None:
                    self.status, self.reason = "waiting", f"model {version} cannot be served: {msg}"
                return self.status
            rec = getattr(app.state, "recommender", None)
            served = getattr(getattr(rec, "bundle", None), "version", version)
            app.state.live = self
            previous, self.current = self.current, (served, app)
            self.swaps += 1
            if previous is not None:  # requests in flight finish on it; its background work stops now
                _close_app(previous[1])
            self.status, self.reason = "ok", None
            log.info("serving model %s of %s (built in %.1f s)", served, self.dataset, time.perf_counter() - t0)
            return self.status

    def watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("model watcher")
            self._stop.wait(self.cfg.stack.reload_poll_s)

    def start_watching(self) -> threading.Thread:
        thread = threading.Thread(target=self.watch, name="learn-model-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            _close_app(self.current[1])

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "dataset": self.dataset,
                "model_version": self.current[0] if self.current else None, "swaps": self.swaps,
                "checked_at": self.checked_at, "poll_s": self.cfg.stack.reload_poll_s,
                "failed_builds": {v: e for v, (_, e) in self.failures.items()}}

    # ------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to set up: the watcher runs in its own thread
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        current = self.current
        app = current[1] if current is not None else self.placeholder
        await app(scope, receive, send)


def _close_app(app: "FastAPI") -> None:
    close = getattr(getattr(app.state, "recommender", None), "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def _build_service_app(cfg: Settings, dataset: str) -> "FastAPI":
    from learn_tasks.online import service as serve

    return serve.create_app(cfg, dataset)


def _placeholder_app(live: LiveService) -> "FastAPI":
    """What answers while no model can be served: health with the reason, the explorer, 503 elsewhere."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from learn_tasks.online import explorer

    app = FastAPI(title="learn recommendations (waiting for a model)", docs_url=None, redoc_url=None)
    app.state.recommender = None
    app.state.live = live
    app.include_router(explorer.router)

    @app.get("/health")
    def health():
        return JSONResponse({"status": live.status if live.status == "loading" else "waiting",
                             "reason": live.reason, "dataset": live.dataset}, status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def not_yet(path: str):
        return JSONResponse({"detail": f"no model is served yet: {live.reason}"}, status_code=503)

    return app


def serve_live(cfg: Settings, dataset: str, host: str, port: int) -> None:
    """Run the live service with uvicorn (blocks until stopped)."""
    import uvicorn

    live = LiveService(cfg, dataset)
    live.start_watching()
    uvicorn.run(live, host=host, port=int(port), log_level="warning", access_log=False, lifespan="on")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m learn_tasks.ops.stack service --dataset D --host H --port P`` (what `learn up` starts)."""
    import argparse

    from learn_tasks.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m learn_tasks.ops.stack")
    sub = parser.add_subparsers(dest="cmd", required=True)
    svc = sub.add_parser("service", help="the recommendation service that follows promoted models")
    svc.add_argument("--dataset", default=None)
    svc.add_argument("--host", default=None)
    svc.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    cfg = load_settings()
    serve_live(cfg, args.dataset or served_dataset(cfg), args.host or cfg.serve.host, args.port or cfg.serve.port)


if __name__ == "__main__":  # pragma: no cover - the service process of `learn up`
    main()
