"""The shared state (learn_tasks/state.py): the promoted run and the release record of each dataset with
their histories, and the locks, on the embedded files backend and, marked ``production``, in the local
PostgreSQL server: round trips, idempotent writes, serialised concurrent writers, one lock holder across
processes (and homes mounted at different paths, as on several hosts), locks freed by kill -9, and the
service's release follower reading the record from PostgreSQL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from learn_tasks import postgres as pg
from learn_tasks import state
from learn_tasks.config import REPO_ROOT, Settings, load_settings
from learn_tasks.online import releases
from learn_tasks.online.follow import ReleaseFollower
from learn_tasks.pch import registry
from learn_tasks.storage import write_json

BACKENDS = ["files", pytest.param("postgres", marks=pytest.mark.production)]


@pytest.fixture(params=BACKENDS)
def cfg(request, settings: Settings) -> Settings:
    """The test's settings on each state backend."""
    if request.param == "files":
        return settings
    return settings.with_overrides(state={"backend": "postgres", "url": request.getfixturevalue("pg_url")})


def _run(cfg: Settings, dataset: str, name: str) -> Path:
    """A complete (as far as the registry looks) run folder."""
    path = registry.dataset_models(cfg, dataset) / name
    write_json({"kind": "learn_hybrid", "created": name}, path / registry.META)
    return path


# ------------------------------------------------------------------------------------- promotions
def test_promote_promoted_and_history_round_trip(cfg: Settings) -> None:
    ds = "books"
    a, b = _run(cfg, ds, "run-a"), _run(cfg, ds, "run-b")
    assert registry.promoted(cfg, ds) is None and registry.promotions(cfg, ds) == []
    assert registry.promote(cfg, ds, a, reason="first") == a
    assert registry.promoted(cfg, ds) == a
    # Promoting the promoted run again (a retried task) writes nothing.
    assert registry.promote(cfg, ds, a, reason="retried") == a
    assert [p["run_id"] for p in registry.promotions(cfg, ds)] == ["run-a"]
    registry.promote(cfg, ds, b, reason="better")
    registry.promote(cfg, ds, a, reason="rollback")
    history = registry.promotions(cfg, ds)
    assert [(p["run_id"], p["reason"]) for p in history] == [("run-a", "first"), ("run-b", "better"),
                                                             ("run-a", "rollback")]
    times = [datetime.fromisoformat(p["at"]) for p in history]
    assert all(t.utcoffset().total_seconds() == 0 for t in times) and times == sorted(times)
    assert registry.promoted(cfg, ds) == a
    # Bad input is refused before anything is written; datasets do not see each other's pointer.
    with pytest.raises(ValueError, match="not a complete run"):
        registry.promote(cfg, ds, a.parent / "missing")
    assert len(registry.promotions(cfg, ds)) == 3 and registry.promoted(cfg, "other") is None
    # A promoted run whose folder is gone reads as nothing promoted.
    (a / registry.META).unlink()
    assert registry.promoted(cfg, ds) is None


def test_release_record_round_trip_idempotent_with_history(cfg: Settings) -> None:
    assert releases.current(cfg, "d") is None and releases.history(cfg, "d") == []
    first, new = releases.write(cfg, "d", "run-a", "items__d__run_a", source="test", rows=3,
                                index_recall_at_10=0.97)
    assert new and first["release_id"] == 1 and first["previous"] is None
    again, new = releases.write(cfg, "d", "run-a", "items__d__run_a", source="test again")
    assert not new and again == first and releases.current(cfg, "d") == first
    second, new = releases.write(cfg, "d", "run-b", "items__d__run_b", source="test", run_key="k")
    assert new and second["release_id"] == 2 and second["run_key"] == "k"
    assert second["previous"] == {"release_id": 1, "model_version": "run-a", "collection": "items__d__run_a"}
    assert releases.current(cfg, "d") == second and releases.history(cfg, "d") == [first, second]
    assert releases.protected_collections(cfg, "d") == {"items__d__run_a", "items__d__run_b"}
    assert releases.current(cfg, "other") is None


def test_concurrent_writers_are_serialised(cfg: Settings) -> None:
    """Eight threads release eight models at once: ids 1..8, each record's previous is the one before."""
    errors: list[BaseException] = []

    def release(i: int) -> None:
        try:
            releases.write(cfg, "many", f"run-{i}", f"items__many__run_{i}", source=f"thread {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=release, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = releases.history(cfg, "many")
    assert [r["release_id"] for r in history] == list(range(1, 9))
    assert sorted(r["model_version"] for r in history) == sorted(f"run-{i}" for i in range(8))
    for before, after in zip(history, history[1:]):
        assert after["previous"] == {k: before[k] for k in ("release_id", "model_version", "collection")}
    assert releases.current(cfg, "many") == history[-1]


# ------------------------------------------------------------------------------------- postgres only
@pytest.mark.production
def test_postgres_state_tables_are_created_once_and_versioned(pg_url: str) -> None:
    import psycopg2

    one, two = state.PostgresState(pg_url), state.PostgresState(pg_url)  # the second finds the tables
    assert one.describe() == {"backend": "postgres", "url": pg.redact(pg_url), "schema_version": 1}
    assert one.promote("schema", "run-a", "first") and not two.promote("schema", "run-a", "again")
    assert two.promoted_run("schema") == "run-a" and len(one.promotions("schema")) == 1
    with psycopg2.connect(pg.dsn(pg_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM learn_state_schema WHERE component = 'state'")
        assert cur.fetchall() == [(1,)]
        # The pointer names the audit row written in the same transaction.
        cur.execute("SELECT p.run_id, h.run_id, h.reason FROM learn_promoted p JOIN learn_promotions h "
                    "ON h.id = p.promotion_id WHERE p.dataset = 'schema'")
        assert cur.fetchall() == [("run-a", "run-a", "first")]
        cur.execute("UPDATE learn_state_schema SET version = 99 WHERE component = 'state'")
    try:
        with pytest.raises(state.StateError, match="schema version 99, newer than"):
            state.PostgresState(pg_url)
    finally:
        with psycopg2.connect(pg.dsn(pg_url)) as conn, conn.cursor() as cur:
            cur.execute("UPDATE learn_state_schema SET version = 1 WHERE component = 'state'")
    one.close()
    two.close()


@pytest.mark.production
def test_files_state_is_imported_into_postgres_once(settings: Settings, pg_url: str) -> None:
    """The upgrade step of a home that ran on files: the same pointers and histories, then nothing more."""
    ds = "upgrade"
    a, b = _run(settings, ds, "run-a"), _run(settings, ds, "run-b")
    registry.promote(settings, ds, a, reason="first")
    registry.promote(settings, ds, b, reason="better")
    releases.write(settings, ds, "run-a", "items__upgrade__run_a", source="test", rows=3)
    releases.write(settings, ds, "run-b", "items__upgrade__run_b", source="test")
    cfg = settings.with_overrides(state={"backend": "postgres", "url": pg_url})
    assert registry.promoted(cfg, ds) is None and releases.current(cfg, ds) is None  # nothing there yet
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LEARN_HOME": str(settings.home),
           "LEARN_STATE__BACKEND": "postgres", "LEARN_STATE__URL": pg_url}
    out = subprocess.run([sys.executable, "-m", "learn_tasks.state", "import", "--dataset", ds], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"dataset": ds, "promotions": 2, "promoted": "run-b", "releases": 2, "release_id": 2,
                               "kept": []}
    assert registry.promoted(cfg, ds) == b and releases.current(cfg, ds) == releases.current(settings, ds)
    assert registry.promotions(cfg, ds) == [
        {**p, "at": datetime.fromisoformat(p["at"]).isoformat()} for p in registry.promotions(settings, ds)]
    assert releases.history(cfg, ds) == releases.history(settings, ds)
    # Again (or after the pipeline wrote there): nothing changes. New writes continue the history.
    again = state.import_files(cfg, ds)
    assert again["kept"] == ["promotions", "releases"] and len(registry.promotions(cfg, ds)) == 2
    assert releases.write(cfg, ds, "run-c", "items__upgrade__run_c", source="test")[0]["release_id"] == 3
    # Bad input is named and nothing is written.
    settings.paths.promotion_history("broken").parent.mkdir(parents=True)
    with open(settings.paths.promotion_history("broken"), "a") as fh:
        fh.write('{"at": "2026-01-01T00:00:00+00:00", "reason": "no run"}\n')
    with pytest.raises(state.StateError, match=r"promotions.jsonl: entry 1 has no run_id"):
        state.import_files(cfg, "broken")
    assert registry.promotions(cfg, "broken") == []


def test_the_state_url_defaults_to_the_event_log_and_is_required(settings: Settings) -> None:
    cfg = settings.with_overrides(state={"backend": "postgres"})
    with pytest.raises(state.StateError, match="LEARN_STATE__URL"):
        state.open_state(cfg)
    with pytest.raises(state.StateError, match="LEARN_STATE__URL"):
        with state.exclusive(cfg, cfg.paths.locks() / "d.lock"):
            pass
    log_url = "postgresql://learn:secret@db.example:5432/learn"
    assert state.state_url(cfg.with_overrides(eventlog={"url": log_url})) == log_url
    assert state.state_url(cfg.with_overrides(eventlog={"url": log_url}, state={"url": "postgresql://o/x"})) == \
        "postgresql://o/x"
    env = {"LEARN_HOME": str(settings.home), "LEARN_STATE__BACKEND": "postgres", "LEARN_STATE__URL": log_url}
    assert state.state_url(load_settings(env=env)) == log_url


def test_an_unreachable_state_database_is_a_clear_error_and_the_service_keeps_answering(settings: Settings) -> None:
    cfg = settings.with_overrides(state={"backend": "postgres", "url": "postgresql://learn:pw@127.0.0.1:1/learn"})
    with pytest.raises(state.StateError, match=r"cannot connect to the state database at .*learn:\*\*\*@") as err:
        releases.current(cfg, "d")
    assert "pw" not in str(err.value)
    follower = ReleaseFollower(cfg, "d")
    assert follower.check() == "degraded" and "cannot read the release record" in follower.reason
    assert follower.serving.recommend(1, 5)["fallback"] is True


@pytest.mark.production
def test_the_follower_reads_the_release_record_from_postgres(settings: Settings, pg_url: str) -> None:
    cfg = settings.with_overrides(state={"backend": "postgres", "url": pg_url})
    follower = ReleaseFollower(cfg, "follow")
    assert follower.check() == "degraded" and follower.reason.startswith("no release for dataset 'follow'")
    rec, new = releases.write(cfg, "follow", "run-x", "items__follow__run_x", source="test")
    assert new
    # The follower found the record (in PostgreSQL: nothing under LEARN_HOME) and tried to load it.
    assert follower.check() == "degraded"
    assert follower.reason.startswith(f"release {rec['release_id']} (model run-x) cannot be served")
    assert str(rec["release_id"]) in follower.describe()["failed_releases"]
    assert not cfg.paths.release("follow").exists() and releases.current(settings, "follow") is None


# ------------------------------------------------------------------------------------- locks
LOCK_CHILD = textwrap.dedent("""
    import os, sys
    from learn_tasks import state
    from learn_tasks.config import load_settings

    path, mode, events = sys.argv[1], sys.argv[2], sys.argv[3]

    def note(what):
        with open(events, "a") as fh:
            fh.write(f"{os.getpid()} {what}\\n")

    cfg = load_settings()
    print("start", flush=True)
    with state.exclusive(cfg, path, wait=(mode == "wait")) as held:
        if held:
            note("acquired")
        print(f"held {held}", flush=True)
        if held:
            sys.stdin.readline()  # hold until told to let go (or killed)
            note("released")
""")


class Holder:
    """A process that takes the lock of ``path`` and holds it until released or killed."""

    def __init__(self, env: dict[str, str], path: Path, events: Path, wait: bool = True):
        self.proc = subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(path), "wait" if wait else "nowait",
                                      str(events)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
        assert self.line() == "start"

    def line(self) -> str:
        return self.proc.stdout.readline().strip()

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _env(cfg: Settings) -> dict[str, str]:
    env = {"LEARN_HOME": str(cfg.home), "LEARN_STATE__BACKEND": cfg.state.backend, "LEARN_STATE__LOCK_POLL_S": "0.5"}
    if cfg.state.url:
        env["LEARN_STATE__URL"] = cfg.state.url
    return env


def _until(pred, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (got := pred()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


def _is_waiting(cfg: Settings, pid: int, name: str) -> bool:
    """Whether process ``pid`` is queued on the lock (PostgreSQL: an ungranted advisory lock of its
    session; files: a blocked flock request of that process in /proc/locks)."""
    if cfg.state.backend == "files":
        return any("->" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines())
    import psycopg2

    with psycopg2.connect(pg.dsn(cfg.state.url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE "
                    "l.locktype = 'advisory' AND NOT l.granted AND a.application_name = %s", (f"learn lock {name}",))
        return cur.fetchone()[0] > 0


def test_one_process_holds_a_lock_the_others_wait_or_get_false(cfg: Settings, tmp_path: Path) -> None:
    path, events = cfg.paths.locks() / "books.lock", tmp_path / "events.txt"
    holder = Holder(_env(cfg), path, events)
    waiter = None
    try:
        assert holder.line() == "held True"
        # Another process that does not wait, and this one, are told at once that it is held.
        other = Holder(_env(cfg), path, events, wait=False)
        assert other.line() == "held False" and other.proc.wait() == 0
        with state.exclusive(cfg, path, wait=False) as held:
            assert held is False
        # A process that waits queues until the holder lets go, then holds it.
        waiter = Holder(_env(cfg), path, events)
        _until(lambda: _is_waiting(cfg, waiter.proc.pid, state.lock_name(cfg, path)), "the waiter never queued")
        holder.release()
        assert waiter.line() == "held True" and holder.proc.wait() == 0
        order = [line.split() for line in events.read_text().splitlines()]
        assert order == [[str(holder.proc.pid), "acquired"], [str(holder.proc.pid), "released"],
                         [str(waiter.proc.pid), "acquired"]]
        waiter.release()
        assert waiter.proc.wait() == 0
        with state.exclusive(cfg, path, wait=False) as held:
            assert held is True  # released on exit
    finally:
        holder.close()
        if waiter is not None:
            waiter.close()


def test_a_lock_is_freed_when_its_holder_is_killed(cfg: Settings, tmp_path: Path) -> None:
    path = cfg.paths.locks() / "books.lock"
    holder = Holder(_env(cfg), path, tmp_path / "events.txt")
    try:
        assert holder.line() == "held True"
        with state.exclusive(cfg, path, wait=False) as held:
            assert held is False
        os.kill(holder.proc.pid, signal.SIGKILL)
        assert holder.proc.wait() == -signal.SIGKILL
    finally:
        holder.close()

    def free() -> bool:
        with state.exclusive(cfg, path, wait=False) as held:
            return held

    _until(free, "the lock of a killed holder was never freed")


@pytest.mark.production
def test_postgres_locks_are_shared_by_homes_mounted_at_different_paths(settings: Settings, pg_url: str,
                                                                      tmp_path: Path) -> None:
    """Two hosts mount the same LEARN_HOME at different paths: the lock is the same; files locks on two
    separate folders are not (why the production profile keeps locks in PostgreSQL)."""
    host_a = settings.with_overrides(state={"backend": "postgres", "url": pg_url})
    host_b = load_settings(env={"LEARN_HOME": str(tmp_path / "elsewhere" / "home")}).with_overrides(
        state={"backend": "postgres", "url": pg_url})
    rel = Path("locks") / "books.lock"
    assert state.lock_name(host_a, Path(host_a.home) / rel) == state.lock_name(host_b, Path(host_b.home) / rel) \
        == "locks/books.lock"
    holder = Holder(_env(host_a), Path(host_a.home) / rel, tmp_path / "events.txt")
    try:
        assert holder.line() == "held True"
        with state.exclusive(host_b, Path(host_b.home) / rel, wait=False) as held:
            assert held is False
        files_b = host_b.with_overrides(state={"backend": "files"})
        with state.exclusive(files_b, Path(files_b.home) / rel, wait=False) as held:
            assert held is True
    finally:
        holder.close()


def test_lock_keys_are_stable_and_distinct() -> None:
    # The key is part of the deployment's contract: every host and release must derive the same one.
    assert pg.lock_key("locks/synth.lock") == -8681427561068925528
    assert len({pg.lock_key(f"locks/d{i}.lock") for i in range(1000)}) == 1000
    assert -2**63 <= pg.lock_key("x") < 2**63
