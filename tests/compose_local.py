"""docker-compose.yml read the way `docker compose` reads it, and its services run as local processes.

No Docker engine runs here, so the production stack is tested by running what the compose file says:

* :func:`load_compose`, :func:`interpolate`: the file with its anchors merged and its ``${VAR}``
  expressions filled from a ``.env`` (the rules of the Compose specification, ``$$`` included);
* :func:`read_image`: an image's ``ENV``, ``WORKDIR``, ``ENTRYPOINT`` and ``CMD`` from its Dockerfile;
* :class:`LocalStack`: each service instance as a local process with the image's environment under the
  service's, its entrypoint and command, and its health check. What differs between a container and a
  local process is mapped, mechanically and in one place (:meth:`LocalStack.localize`):

  - container paths -> local folders: each volume (a named volume -> a folder of the test, shared by every
    service that mounts it; a bind mount -> its host path), the project source the images copy
    (``/opt/learn/src``) -> this checkout, any other path under the image's working folders -> a private
    folder per container;
  - ``service:port`` of a service that is not started here -> the local server standing in for it
    (PostgreSQL, a Milvus Lite server), and of one that is -> that instance's local port;
  - the ports a container listens on -> free local ports, and ``0.0.0.0`` -> ``127.0.0.1`` (every
    container has its own network namespace; this machine has one);
  - every container gets its own hostname, as in Docker (a UTS namespace: ``unshare --uts``), so Airflow
    and Celery see one host per container;
  - the executables the images provide (``airflow``, ``celery``, ``learn``, ``evidently``, ``torchrun``,
    ``python``) are this environment's, the one the images are built to match (``-c constraints.txt``).

A typo in a command, a variable, a health check or a path of the compose file therefore fails here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import psutil
import yaml

from helpers import free_port
from learn_tasks.config import REPO_ROOT
from learn_tasks.processes import with_descendants

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
GEN_ENV = REPO_ROOT / "docker" / "gen_env.py"
INIT_SQL = REPO_ROOT / "docker" / "postgres" / "init-databases.sh"
SECRET_VARS = ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "FEAST_DB_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD",
               "MILVUS_ROOT_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
               "AIRFLOW_API_SECRET_KEY", "LEARN_API_TOKEN", "EVIDENTLY_SECRET", "LEARN_DB_PASSWORD")  # what gen_env.py generates
SOURCE_IN_IMAGE = "/opt/learn/src"  # where both Dockerfiles copy the project
# Executables of the images -> this environment (module run with this interpreter)
EXECUTABLES = {"airflow": "airflow", "celery": "celery", "learn": "learn_tasks.cli", "evidently": "evidently.cli",
               "torchrun": "torch.distributed.run", "python": None}


# ==================================================================================================
# The compose file and .env
# ==================================================================================================
def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # anchors and `<<` merges resolved


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""
    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("plain")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?(.*)", expr, re.S).groups()
        value = env.get(name)
        missing = (not value) if op in (":-", ":?") else value is None
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?"):
            if missing:
                raise KeyError(f"required variable {name} is missing: {arg}")
            return value
        return value or ""

    return _VAR.sub(repl, text)


def variables(text: str) -> set[str]:
    names = set()
    for m in _VAR.finditer(text):
        expr = m.group("braced") or m.group("plain")
        if expr:
            names.add(re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr).group(0))
    return names


def read_dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value
    return out


def env_example() -> dict[str, str]:
    return read_dotenv(ENV_EXAMPLE)


def _gen_env_module():
    spec = importlib.util.spec_from_file_location("gen_env", GEN_ENV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_env() -> dict[str, str]:
    """What `python docker/gen_env.py` would write to .env, as a dict."""
    text, _ = _gen_env_module().render(ENV_EXAMPLE.read_text(encoding="utf-8"))
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def write_dotenv(path: Path, overrides: Mapping[str, str]) -> dict[str, str]:
    """Run docker/gen_env.py to write ``path`` (every secret generated), set ``overrides`` in it, read it back."""
    assert _gen_env_module().main(["--output", str(path)]) == 0
    lines, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in overrides:
            line, _ = f"{key}={overrides[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_dotenv(path)


def service_env(compose: dict, service: str, env: Mapping[str, str]) -> dict[str, str]:
    raw = compose["services"][service].get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), env) for k, v in raw.items()}


@contextlib.contextmanager
def stack_databases(dotenv: Mapping[str, str], tag: str, pg: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """Fresh Airflow, Feast and event-log databases and roles (names with ``tag``), made by the stack's own
    init script (docker/postgres/init-databases.sh) with the passwords of ``dotenv``; dropped afterwards."""
    import psycopg2

    admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **pg)
    admin.autocommit = True
    names = {"AIRFLOW_DB_NAME": f"learn_t_af_{tag}", "AIRFLOW_DB_USER": f"learn_t_af_{tag}",
             "FEAST_DB_NAME": f"learn_t_fe_{tag}", "FEAST_DB_USER": f"learn_t_fe_{tag}",
             "LEARN_DB_NAME": f"learn_t_ev_{tag}", "LEARN_DB_USER": f"learn_t_ev_{tag}"}
    env = {**os.environ, **names, "PGHOST": str(pg["host"]), "PGPORT": str(pg["port"]), "POSTGRES_USER": pg["user"],
           "POSTGRES_DB": "postgres", **{k: dotenv[k] for k in ("AIRFLOW_DB_PASSWORD", "FEAST_DB_PASSWORD",
                                                                  "LEARN_DB_PASSWORD")}}
    try:
        done = subprocess.run(["bash", str(INIT_SQL)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        yield names
    finally:
        with admin.cursor() as cur:
            for db in (names["AIRFLOW_DB_NAME"], names["FEAST_DB_NAME"], names["LEARN_DB_NAME"]):
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for role in (names["AIRFLOW_DB_USER"], names["FEAST_DB_USER"], names["LEARN_DB_USER"]):
                cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


# ==================================================================================================
# Images
# ==================================================================================================
@dataclass
class Image:
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


def read_image(dockerfile: Path) -> Image:
    """ENV, the last WORKDIR, ENTRYPOINT and CMD (exec form) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    img = Image()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                img.env[key] = value
        elif word == "WORKDIR":
            img.workdir = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            argv = json.loads(rest)
            if word == "ENTRYPOINT":
                img.entrypoint, img.cmd = argv, None  # a new entrypoint resets CMD
            else:
                img.cmd = argv
    return img


def _argv(value: Any) -> list[str] | None:
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


# ==================================================================================================
# Local processes
# ==================================================================================================
# In new UTS and mount namespaces: set the hostname, and make it resolve (Docker writes it into the
# container's /etc/hosts; torchrun's rendezvous, for one, looks it up), then run the command.
_AS_CONTAINER = 'hostname "$0" && mount --bind "$LOCAL_STACK_HOSTS" /etc/hosts && exec "$@"'


def uts_prefix() -> list[str] | None:
    """The command prefix that gives a process its own hostname (and /etc/hosts), or None where that is
    not allowed (as root, or with unprivileged user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = Path(tempfile.mkdtemp(prefix="learn-uts-")) / "hosts"
    probe.write_text("127.0.0.1 localhost learn-probe\n")
    for prefix in ([unshare, "--mount", "--uts"], [unshare, "--user", "--map-root-user", "--mount", "--uts"]):
        try:
            ok = subprocess.run([*prefix, "--", "sh", "-c", _AS_CONTAINER, "learn-probe", "true"], capture_output=True,
                                timeout=30, env={**os.environ, "LOCAL_STACK_HOSTS": str(probe)})
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0:
            return prefix
    return None


@dataclass
class Instance:
    """One container: a service's process (or a one-off's run) with its log."""
    service: str
    name: str  # its hostname
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ports: dict[int, int]  # container port -> local port
    log: Path
    proc: subprocess.Popen | None = None
    born: float = 0.0

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalStack:
    """Services of docker-compose.yml as local processes (see the module docstring).

    ``standins``: ``"service:port" -> "host:port"`` for services that are not run here. ``listens``: the
    container ports each service listens on. ``extra_env``: added to every learn/Airflow container's
    environment (what an operator's override file would add), after the compose file's.
    """

    def __init__(self, root: Path, dotenv: Mapping[str, str], standins: Mapping[str, str],
                 listens: Mapping[str, Sequence[int]], extra_env: Mapping[str, str] | None = None,
                 uts: Sequence[str] | None = None):
        self.root, self.dotenv = Path(root), dict(dotenv)
        self.compose = load_compose()
        self.standins, self.listens = dict(standins), {k: list(v) for k, v in listens.items()}
        self.extra_env = dict(extra_env or {})
        self.uts = list(uts) if uts else None
        self.instances: list[Instance] = []
        self.bin = self.root / "bin"
        self._write_executables()

    # ------------------------------------------------------------------------------------ parts
    def _write_executables(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, module in EXECUTABLES.items():
            run = f'exec "{sys.executable}"' + (f" -m {module}" if module else "") + ' "$@"'
            path = self.bin / name
            path.write_text(f"#!/bin/sh\n{run}\n")
            path.chmod(0o755)

    def service(self, name: str) -> dict[str, Any]:
        return self.compose["services"][name]

    def image(self, service: str) -> Image:
        build = self.service(service).get("build")
        return read_image(REPO_ROOT / build["dockerfile"]) if build else Image(workdir="/data")

    def volume_dir(self, name: str) -> Path:
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mounts(self, service: str, private: Path) -> list[tuple[str, str]]:
        """(container path, local path): the project source, the service's volumes, and a private folder
        per container for the rest of what the images use (/opt/airflow is AIRFLOW_HOME)."""
        out = {SOURCE_IN_IMAGE: str(REPO_ROOT)}
        for vol in self.service(service).get("volumes", []):
            parts = interpolate(vol, self.dotenv).split(":")
            source, target = parts[0], parts[1]
            if source.startswith((".", "/")):
                local = (REPO_ROOT / source).resolve() if source.startswith(".") else Path(source)
                local.mkdir(parents=True, exist_ok=True)
            else:
                local = self.volume_dir(source)
            out[target] = str(local)
        for top in ("/opt/airflow", "/opt/learn", "/data"):
            out.setdefault(top, str(private / top.strip("/").replace("/", "_")))
        return sorted(out.items(), key=lambda m: -len(m[0]))

    def localize(self, text: str, service: str, mounts: Sequence[tuple[str, str]], ports: Mapping[int, int]) -> str:
        paths = dict(mounts)
        alternation = "|".join(re.escape(c) for c, _ in mounts)  # longest first
        text = re.sub(rf"(?<![\w/])({alternation})(?=$|[/\s\"':;,])", lambda m: paths[m.group(1)], text)

        def other(m: re.Match) -> str:
            key = f"{m.group(1)}:{m.group(2)}"
            if key in self.standins:
                return self.standins[key]
            if m.group(1) == service and int(m.group(2)) in ports:  # the instance being built
                return f"127.0.0.1:{ports[int(m.group(2))]}"
            running = [i for i in self.instances if i.service == m.group(1) and int(m.group(2)) in i.ports]
            if running:
                return f"127.0.0.1:{running[0].ports[int(m.group(2))]}"
            return m.group(0)

        names = "|".join(sorted((re.escape(s) for s in self.compose["services"]), key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])({names}):(\d+)\b", other, text)
        for cport, lport in ports.items():
            text = re.sub(rf"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):{cport}\b", f"127.0.0.1:{lport}", text)
            text = re.sub(rf"(?<=--port ){cport}\b", str(lport), text)
            if text == str(cport):
                text = str(lport)
        return "127.0.0.1" if text == "0.0.0.0" else text

    # ------------------------------------------------------------------------------------ instances
    def instance(self, service: str, name: str | None = None, command: Sequence[str] | None = None) -> Instance:
        """The process a container of ``service`` would run (not started); ``command`` replaces the
        compose command as in ``docker compose run SERVICE ARGS``."""
        svc, img = self.service(service), self.image(service)
        replicas = sum(i.service == service for i in self.instances)
        name = name or (f"{service}-{replicas + 1}" if replicas or service == "airflow-worker" else service)
        private = self.root / "containers" / name
        ports = {p: free_port() for p in self.listens.get(service, [])}
        mounts = self.mounts(service, private)
        loc = lambda s: self.localize(interpolate(s, self.dotenv), service, mounts, ports)  # noqa: E731
        entrypoint = _argv(svc.get("entrypoint")) if "entrypoint" in svc else img.entrypoint
        cmd = list(command) if command is not None else (_argv(svc.get("command")) if "command" in svc else
                                                         (img.cmd if "entrypoint" not in svc else None))
        argv = [loc(a) for a in [*(entrypoint or []), *(cmd or [])]]
        assert argv, f"{service}: nothing to run"
        env = {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
               "HOME": str(private / "home"), "LANG": "C.UTF-8", "HOSTNAME": name}
        env.update({k: self.localize(v, service, mounts, ports) for k, v in img.env.items()})
        env.update({k: loc(str(v)) for k, v in (svc.get("environment") or {}).items()})
        if svc.get("build"):  # the learn and Airflow containers: the operator's extra settings
            env.update(self.extra_env)
        cwd = Path(self.localize(img.workdir, service, mounts, ports))
        for path in (private / "home", cwd, *(Path(local) for _, local in mounts)):
            path.mkdir(parents=True, exist_ok=True)
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        inst = Instance(service, name, argv, env, cwd, ports, log)
        self.instances.append(inst)
        return inst

    def start(self, inst: Instance) -> Instance:
        argv, env = inst.argv, inst.env
        if self.uts:  # its own hostname, like a container
            hosts = self.root / "containers" / inst.name / "hosts"
            hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {inst.name}\n")
            argv = [*self.uts, "--", "sh", "-c", _AS_CONTAINER, inst.name, *argv]
            env = {**env, "LOCAL_STACK_HOSTS": str(hosts)}
        with open(inst.log, "ab") as out:
            inst.proc = subprocess.Popen(argv, env=env, cwd=inst.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        inst.born = time.time()
        return inst

    def up(self, service: str, name: str | None = None) -> Instance:
        return self.start(self.instance(service, name))

    def run_once(self, service: str, command: Sequence[str] | None = None, timeout_s: float = 900) -> Instance:
        """A one-off container (airflow-init, learn-train) to the end; fails with its log if it fails."""
        inst = self.start(self.instance(service, command=command))
        try:
            code = inst.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(inst)
            raise AssertionError(f"{inst.name} still running after {timeout_s:.0f} s:\n{inst.tail()}") from None
        assert code == 0, f"{inst.name} exited with {code}:\n{inst.tail(60)}"
        return inst

    def exec_in(self, inst: Instance, argv: Sequence[str], timeout_s: float = 600,
                stdin: str | None = None) -> subprocess.CompletedProcess:
        """`docker compose exec`: a command in a running container's environment."""
        return subprocess.run(list(argv), env=inst.env, cwd=inst.cwd, capture_output=True, text=True,
                              timeout=timeout_s, input=stdin)

    # ------------------------------------------------------------------------------------ health
    def health_argv(self, inst: Instance) -> list[str]:
        test = self.service(inst.service)["healthcheck"]["test"]
        mounts = self.mounts(inst.service, self.root / "containers" / inst.name)
        loc = [self.localize(interpolate(t, self.dotenv), inst.service, mounts, inst.ports) for t in test]
        if loc[0] == "CMD-SHELL":
            return ["sh", "-c", loc[1]]
        assert loc[0] == "CMD", f"{inst.service}: health check {test[0]!r}"
        return loc[1:]

    def healthy(self, inst: Instance) -> tuple[bool, str]:
        check = self.service(inst.service)["healthcheck"]
        limit = max(60.0, float(str(check.get("timeout", "30s")).rstrip("s")))
        try:
            done = subprocess.run(self.health_argv(inst), env=inst.env, cwd=inst.cwd, capture_output=True,
                                  text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return False, f"health check still running after {limit:.0f} s"
        return done.returncode == 0, (done.stdout + done.stderr)[-500:]

    def wait_healthy(self, insts: Sequence[Instance], timeout_s: float = 600) -> dict[str, float]:
        """Poll each instance's compose health check until it passes; fail when one exits or time runs out.

        Returns seconds from start to healthy per instance."""
        pending, took, last = list(insts), {}, {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for inst in list(pending):
                if inst.exited() is not None:
                    raise AssertionError(f"{inst.name} exited with {inst.exited()} while starting:\n{inst.tail(60)}")
                ok, out = self.healthy(inst)
                last[inst.name] = out
                if ok:
                    took[inst.name] = round(time.time() - inst.born, 1)
                    pending.remove(inst)
            if pending and time.monotonic() > deadline:
                raise AssertionError("not healthy in time: " + "; ".join(
                    f"{i.name}: {last.get(i.name)!r}\n{i.tail()}" for i in pending))
            if pending:
                time.sleep(3)
        return took

    # ------------------------------------------------------------------------------------ stop
    def stop(self, inst: Instance, grace_s: float = 30.0) -> None:
        if inst.proc is None:
            return
        procs: list[psutil.Process] = []
        try:
            procs = with_descendants(psutil.Process(inst.proc.pid))
        except psutil.Error:
            pass
        try:
            os.killpg(inst.proc.pid, signal.SIGTERM)
        except OSError:
            pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(inst.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            inst.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def down(self) -> None:
        """Stop every instance this stack started, newest first (each with whatever it spawned)."""
        for inst in reversed(self.instances):
            self.stop(inst)
