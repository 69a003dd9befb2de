"""The local stack (``learn up/status/down``) and the recommendation explorer's API.

Process handling runs on real processes; the service (following releases) and the explorer run over a real
model trained for one epoch on generated data, with real Feast (SQLite) and Milvus Lite. The full four-part stack,
Airflow included, is started by tests/test_browser.py (one stack for all browser tests).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import free_port
from learn_tasks.online import explorer
from learn_tasks.ops import stack
from learn_tasks.ops import supervisor
from learn_tasks import processes
from learn_tasks.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
LEARN = str(Path(sys.executable).parent / "learn")
TOKEN = "stack-test-token"


# ------------------------------------------------------------------------------------- pure helpers
def test_spread_picks_users_from_most_to_least_active() -> None:
    assert explorer.spread(10, 3) == [0, 4, 9]  # first, middle (4.5 rounds to even), last
    assert explorer.spread(3, 10) == [0, 1, 2]
    assert explorer.spread(0, 5) == [] and explorer.spread(5, 0) == []


def test_urls_and_password_file_follow_the_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = settings.with_overrides(stack={"airflow_port": 18080}, serve={"port": 18000},
                                  monitor={"ui_port": 18001}, index={"server_port": 18002})
    assert stack.urls(cfg) == {"airflow": "http://127.0.0.1:18080", "service": "http://127.0.0.1:18000",
                               "evidently": "http://127.0.0.1:18001", "milvus": "http://127.0.0.1:18002"}
    home = Path(cfg.home).resolve()
    monkeypatch.delenv(stack.PASSWORD_FILE_ENV, raising=False)
    assert stack.airflow_password_file(cfg) == home / "airflow" / "simple_auth_manager_passwords.json.generated"
    monkeypatch.setenv(stack.PASSWORD_FILE_ENV, "/somewhere/pw.json")
    assert stack.airflow_password_file(cfg) == Path("/somewhere/pw.json")


def test_airflow_env_is_loopback_small_and_uses_the_project_dags(settings: Settings) -> None:
    cfg = settings.with_overrides(stack={"airflow_port": 18080, "airflow_parallelism": 2})
    env = stack.airflow_env(cfg, {})
    assert env["AIRFLOW_HOME"] == str(Path(cfg.home).resolve() / "airflow")
    assert Path(env["AIRFLOW__CORE__DAGS_FOLDER"]) == REPO / "dags"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__CORE__PARALLELISM"] == "2"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"  # only runs people trigger
    # No component opens Airflow's all-interfaces log servers.
    assert all("--skip-serve-logs" in argv for name, argv in stack.airflow_commands(cfg).items()
               if name in ("airflow-scheduler", "airflow-triggerer"))


def test_unknown_component_is_a_clear_error() -> None:
    with pytest.raises(stack.StackError, match="unknown component"):
        stack._selected(["airflow", "grafana"])
    assert stack._selected(["service"]) == ["milvus", "service"]  # the service needs the Milvus server


# ------------------------------------------------------------------------------------- processes
CHILD = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
         " time.sleep(120)")


def _wait_for(pred, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_spawn_and_stop_take_the_whole_process_group(settings: Settings) -> None:
    rec = supervisor.spawn(settings, "sleeper", [sys.executable, "-c", CHILD], dict(os.environ))
    assert supervisor.pid_file(settings, "sleeper").exists() and rec["pgid"] == rec["pid"]
    _wait_for(lambda: len(supervisor.members(rec)) == 2)  # the process and the child it started
    pids = [p.pid for p in supervisor.members(rec)]
    assert supervisor.stop_record(rec, grace_s=5) is True
    assert not supervisor.members(rec)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert supervisor.stop_record(rec) is False  # nothing left to stop


def test_a_recycled_pid_is_never_signalled(settings: Settings) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        # A record that names this pid but another process (a start time that does not match).
        fake = {"pid": other.pid, "pgid": other.pid, "create_time": psutil.Process(other.pid).create_time() + 1000}
        assert processes.alive(fake) is None and supervisor.members(fake) == []
        assert supervisor.stop_record(fake) is False
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------------------------- learn up / down
def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LEARN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.integration
def test_up_is_idempotent_and_down_stops_everything_it_started(tmp_path: Path) -> None:
    """`learn up --only service,evidently` (Milvus comes along), a second `up` is a no-op, `down` stops all."""
    env = {**os.environ, "LEARN_HOME": str(tmp_path / "home"), "LEARN_SERVE__PORT": str(free_port()),
           "LEARN_MONITOR__UI_PORT": str(free_port()), "LEARN_INDEX__SERVER_PORT": str(free_port()),
           "LEARN_STACK__AIRFLOW_PORT": str(free_port()), "LEARN_API_TOKEN": TOKEN}
    cfg = load_settings(env=env)
    try:
        first = _cli(["up", "--only", "service,evidently", "--dataset", "synth", "--json"], env)
        assert first.returncode == 0, first.stderr
        urls = json.loads(first.stdout.strip().splitlines()[-1])
        assert set(urls) == {"airflow", "service", "evidently", "milvus"} and urls["airflow"] is None
        assert urls["service"] == f"http://127.0.0.1:{env['LEARN_SERVE__PORT']}"
        # Up without a model: health says what is missing (HTTP 200: the service answers with popular items),
        # the explorer page is there anyway.
        code, body = processes.http_json(urls["service"] + "/health")
        assert code == 200 and body["status"] == "degraded" and body["reason"].startswith("no model yet: no release")
        assert "Recommendation explorer" in _get_text(urls["service"] + "/explorer")
        assert processes.http_json(urls["evidently"] + "/api/version")[0] == 200
        recs = {n: json.loads(supervisor.pid_file(cfg, n).read_text()) for n in ("milvus", "service", "evidently")}
        pids = {n: r["pid"] for n, r in recs.items()}
        # Logs can hold secrets: run/ and its logs are private.
        assert stat.S_IMODE(supervisor.run_dir(cfg).stat().st_mode) == 0o700
        assert all(stat.S_IMODE(stack.log_file(cfg, n).stat().st_mode) == 0o600 for n in ("service", "evidently"))

        again = _cli(["up", "--only", "service,evidently", "--dataset", "synth", "--json"], env)
        assert again.returncode == 0 and "already running" in again.stderr
        assert json.loads(again.stdout.strip().splitlines()[-1]) == urls
        assert {n: json.loads(supervisor.pid_file(cfg, n).read_text())["pid"] for n in pids} == pids  # no second copy

        st = _cli(["status", "--json"], env)
        assert st.returncode == 3  # airflow is not running
        comps = json.loads(st.stdout)["components"]
        assert comps["service"]["running"] and comps["evidently"]["healthy"] and not comps["airflow"]["running"]
    finally:
        down = _cli(["down", "--json"], env)
    assert down.returncode == 0, down.stderr
    assert set(json.loads(down.stdout)["stopped"]) == {"milvus", "service", "evidently"}
    for rec in recs.values():
        assert processes.alive(rec) is None and not supervisor.members(rec)
    assert not list(supervisor.run_dir(cfg).glob("*.json"))
    again_down = _cli(["down"], env)
    assert again_down.returncode == 0 and "nothing to stop" in again_down.stdout


def _get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


# ------------------------------------------------------------------------------------- live service + explorer
@pytest.fixture(scope="module")
def model_home(tmp_path_factory: pytest.TempPathFactory):
    """Generated data, encoded and trained for one epoch (not promoted yet); Feast features built."""
    from learn_tasks.data import datasets as data
    from learn_tasks.ceg import encode
    from learn_tasks.online import features
    from learn_tasks.data import synth
    from learn_tasks.training import train

    home = tmp_path_factory.mktemp("stack") / "learn_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEARN_HOME", str(home))
    mp.setenv("LEARN_API_TOKEN", TOKEN)
    cfg = load_settings(overrides=["index.index_type=FLAT", "features.recent_items=20", "train.val_users=50",
                                   "serve.release_poll_s=0.5"])
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=80, n_items=120))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    encode.encode_catalogue(cfg, "synth")
    run = train.train_model(cfg, "synth", model="learn", epochs=1)
    features.materialize_features(cfg, "synth")
    yield cfg, Path(run["run_dir"])
    from learn_tasks.online import index

    index.close(cfg)
    mp.undo()


@pytest.mark.integration
def test_service_waits_for_a_release_then_serves_it_with_the_explorer(model_home) -> None:
    from fastapi.testclient import TestClient

    from learn_tasks import schema as S
    from learn_tasks.data import datasets as data
    from learn_tasks.online import index
    from learn_tasks.online import service as serve
    from learn_tasks.pch import registry

    cfg, run_dir = model_home
    app = serve.create_app(cfg, "synth")
    svc = app.state.live  # the release follower
    client = TestClient(app, raise_server_exceptions=False)

    # 1. Nothing released: popular items answer, and /health, the explorer API and the page say why.
    assert svc.check() == "degraded" and "no release" in svc.reason
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["reason"].startswith("no model yet")
    page = client.get("/explorer")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="user-select"' in page.text and 'id="add-form"' in page.text
    st = client.get("/explorer/api/status").json()
    assert st["ready"] is False and "no release" in st["reason"] and st["dataset"] == "synth"
    assert client.get("/explorer/api/users").status_code == 503
    popular = client.get("/recommendations/1000").json()
    assert popular["strategy"] == "popular" and popular["reason"] == "no model yet" and popular["items"]

    # 2. Promoted but not indexed: nothing is released yet, and it says so.
    registry.promote(cfg, "synth", run_dir)
    assert svc.check() == "degraded" and "no release" in svc.reason

    # 3. Indexed (and so released): the next look swaps the model in.
    index.index_catalogue(cfg, "synth")
    assert svc.check() == "ok" and svc.recommender.bundle.version == run_dir.name and svc.swaps == 1
    assert client.get("/health").json()["status"] == "ok"
    st = client.get("/explorer/api/status").json()
    assert st["ready"] and st["model_version"] == run_dir.name and st["live"]["status"] == "ok"
    assert svc.check() == "ok" and svc.swaps == 1  # same release: no rebuild

    # Users: spread over activity, most active first, plus an id nobody has.
    inter = data.load_interactions(cfg, "synth")
    counts = inter[S.USER_ID].value_counts()
    users = client.get("/explorer/api/users", params={"limit": 5}).json()
    assert users["total_users"] == len(counts) and len(users["users"]) == 5
    assert users["users"][0]["events"] == counts.max() and users["users"][-1]["events"] == counts.min()
    assert users["unknown_user"] == int(inter[S.USER_ID].max()) + 1

    # History: the online feature store's recent items, with catalogue titles.
    user = users["users"][0]["user_id"]
    hist = client.get(f"/explorer/api/history/{user}").json()
    rec = app.state.recommender
    assert [h[S.ITEM_ID] for h in hist["items"]] == list(rec.online_features(user)[S.RECENT_ITEM_IDS])
    titles = data.load_items(cfg, "synth").set_index(S.ITEM_ID)[S.TITLE]
    assert all(h[S.TITLE] == titles[h[S.ITEM_ID]] for h in hist["items"]) and hist["known"]
    unknown = client.get(f"/explorer/api/history/{users['unknown_user']}").json()
    assert unknown["known"] is False and unknown["items"] == []
    fallback = client.get(f"/recommendations/{users['unknown_user']}").json()
    assert fallback["fallback"] is True and fallback["strategy"] == "popular"
    assert client.get("/explorer/api/history/-1").status_code == 422

    # 4. The next run promotes and indexes a newer model: served from the next look on, no restart.
    from learn_tasks.training import train

    run2 = Path(train.train_model(cfg, "synth", model="learn", epochs=1)["run_dir"])
    assert run2.name != run_dir.name
    registry.promote(cfg, "synth", run2)
    assert svc.check() == "ok" and svc.recommender.bundle.version == run_dir.name  # not released: the old one serves
    index.index_catalogue(cfg, "synth")
    assert svc.check() == "ok" and svc.recommender.bundle.version == run2.name and svc.swaps == 2
    assert client.get("/explorer/api/status").json()["model_version"] == run2.name
    assert client.get(f"/recommendations/{user}").json()["model_version"] == run2.name
