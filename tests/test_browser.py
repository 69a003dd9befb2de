"""The web pages, in a real browser: headless Chromium from Debian's packages, driven by Selenium.

One local stack (``learn up``, on free loopback ports, tiny generated data) serves the whole module:

1. the Airflow UI: log in, trigger ``learn_pipeline`` from the trigger form with parameters (dataset,
   mode, epochs, training budget) and see the run succeed;
2. the recommendation explorer: pick a user, see history and recommendations, add an item and see it
   ranked for the user;
3. the Evidently on-call dashboard: the cold-start and long-tail panels and the alert thresholds;
4. ``learn down`` stops everything ``learn up`` started.

Chromium and chromedriver come from ``/usr/bin`` (``scripts/ensure_chromium.sh`` installs Debian's
``chromium`` and ``chromium-driver`` where missing); nothing is downloaded, and Selenium Manager never
runs because the driver path is given. Each test saves a screenshot under ``$LEARN_SCREENSHOT_DIR``
(default: ``<the test LEARN_HOME>/screenshots/``) and prints its path.
"""
from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -c constraints.txt -e '.[dev]'"
    gone = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if gone:
        return (f"{' and '.join(gone)} missing: Debian's chromium and chromium-driver packages could not be "
                f"installed (run scripts/ensure_chromium.sh as root)")
    return None


if (_reason := _missing()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from helpers import free_port
from learn_tasks.data import datasets as data
from learn_tasks.monitoring import dashboard
from learn_tasks.ops import stack
from learn_tasks.ops import supervisor
from learn_tasks import processes
from learn_tasks.data import synth  # noqa: E402
from learn_tasks.config import load_settings  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]

LEARN = str(Path(sys.executable).parent / "learn")
REPO = Path(__file__).resolve().parents[1]
DATASET = "synth"
TOKEN = "browser-test-token"
RUN_PARAMS = {"dataset": DATASET, "mode": "full", "epochs": 1, "budget_s": 5}  # seconds of training
PIPELINE_TIMEOUT_S = 1500  # the whole DAG on two busy cores, every task a fresh process
_runs: dict[str, Any] = {}  # the successful learn_pipeline run, for the tests after the Airflow one


# ==================================================================================================
# Fixtures: one stack, one browser
# ==================================================================================================
@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """`learn up --json` on free ports over a tiny prepared dataset; `learn down` at the end."""
    home = tmp_path_factory.mktemp("browser") / "learn_home"
    env = {**os.environ, "LEARN_HOME": str(home), "LEARN_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1",
           "LEARN_STACK__AIRFLOW_PORT": str(free_port()), "LEARN_SERVE__PORT": str(free_port()),
           "LEARN_MONITOR__UI_PORT": str(free_port()), "LEARN_INDEX__SERVER_PORT": str(free_port()),
           "LEARN_STACK__RELOAD_POLL_S": "2",
           # Small and quick: an exact index, small evaluation samples, short user histories.
           "LEARN_INDEX__INDEX_TYPE": "FLAT", "LEARN_TRAIN__VAL_USERS": "50", "LEARN_FEATURES__RECENT_ITEMS": "20"}
    cfg = load_settings(env=env)
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=80, n_items=120))
    data.prepare_dataset(cfg, "seqrec", src, DATASET)
    up = subprocess.run([LEARN, "up", "--dataset", DATASET, "--json"], env=env, capture_output=True, text=True,
                        timeout=900, cwd=REPO)
    if up.returncode != 0:
        subprocess.run([LEARN, "down"], env=env, capture_output=True, timeout=300, cwd=REPO)
        pytest.fail(f"learn up failed ({up.returncode}):\n{up.stderr[-4000:]}")
    urls = json.loads(up.stdout.strip().splitlines()[-1])
    records = {p.stem: json.loads(p.read_text()) for p in supervisor.run_dir(cfg).glob("*.json")}
    shots = Path(os.environ.get("LEARN_SCREENSHOT_DIR") or home / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    yield {"cfg": cfg, "env": env, "urls": urls, "up_stdout": up.stdout, "records": records, "shots": shots}
    subprocess.run([LEARN, "down"], env=env, capture_output=True, timeout=300, cwd=REPO)  # no-op after the test


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must never fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # fresh profile
    opts.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def screenshot(driver, local_stack, name: str, capsys: pytest.CaptureFixture) -> Path:
    path = local_stack["shots"] / f"{name}.png"
    driver.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def wait(driver, timeout: float, what: Callable[[Any], Any], message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.5,
                         ignored_exceptions=(WebDriverException,)).until(what, message)


# ==================================================================================================
# Airflow REST API (to follow a run precisely; the browser shows it)
# ==================================================================================================
def _password(local_stack) -> str:
    return json.loads(stack.airflow_password_file(local_stack["cfg"]).read_text())["admin"]


def _airflow_api(local_stack, path: str, body: dict | None = None, tries: int = 5) -> Any:
    """GET (or POST ``body``) on Airflow's REST API. The api-server runs one worker on a busy machine and
    also serves the tasks' execution API, so a slow answer is retried rather than failed."""
    base = local_stack["urls"]["airflow"]

    def call(req: urllib.request.Request) -> Any:
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == tries - 1:
                    raise
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                if attempt == tries - 1:
                    raise
            time.sleep(5)

    if "token" not in local_stack:
        login = json.dumps({"username": "admin", "password": _password(local_stack)}).encode()
        local_stack["token"] = call(urllib.request.Request(f"{base}/auth/token", data=login, method="POST",
                                                           headers={"Content-Type": "application/json"}))["access_token"]
    return call(urllib.request.Request(base + path, method="POST" if body is not None else "GET",
                                       data=json.dumps(body).encode() if body is not None else None,
                                       headers={"Authorization": f"Bearer {local_stack['token']}",
                                                "Content-Type": "application/json"}))


def _wait_for_run(local_stack, run_id: str) -> dict[str, Any]:
    """Poll the run until it finishes; fail with every task's state (and the failure notes) if it fails."""
    quoted = urllib.parse.quote(run_id, safe="")
    deadline = time.monotonic() + PIPELINE_TIMEOUT_S
    while True:
        run = _airflow_api(local_stack, f"/api/v2/dags/learn_pipeline/dagRuns/{quoted}")
        if run["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"learn_pipeline run {run_id} still {run['state']}"
        time.sleep(5)
    tis = _airflow_api(local_stack, f"/api/v2/dags/learn_pipeline/dagRuns/{quoted}/taskInstances")["task_instances"]
    states = {t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t["state"] for t in tis}
    if run["state"] != "success":
        notes = [p.read_text() for p in Path(local_stack["cfg"].home).glob("pipeline/*/failures/*.json")]
        pytest.fail(f"learn_pipeline run {run_id} {run['state']}: {states}\n" + "\n".join(notes)[-3000:])
    return {"run_id": run_id, "states": states, "conf": run.get("conf")}


def ensure_pipeline_ran(local_stack) -> dict[str, Any]:
    """The run the Airflow UI test triggered; when that test was not selected, one triggered by the REST API."""
    if "run" not in _runs:
        now = datetime.now(timezone.utc).isoformat()
        run = _airflow_api(local_stack, "/api/v2/dags/learn_pipeline/dagRuns",
                           {"logical_date": now, "conf": RUN_PARAMS})
        _runs["run"] = _wait_for_run(local_stack, run["dag_run_id"])
    return _runs["run"]


# ==================================================================================================
# Tests
# ==================================================================================================
def test_learn_up_prints_the_four_addresses(local_stack) -> None:
    urls = local_stack["urls"]
    assert set(urls) == {"airflow", "service", "evidently", "milvus"}
    env = local_stack["env"]
    assert urls["airflow"] == f"http://127.0.0.1:{env['LEARN_STACK__AIRFLOW_PORT']}"
    assert urls["service"] == f"http://127.0.0.1:{env['LEARN_SERVE__PORT']}"
    assert urls["evidently"] == f"http://127.0.0.1:{env['LEARN_MONITOR__UI_PORT']}"
    assert urls["milvus"] == f"http://127.0.0.1:{env['LEARN_INDEX__SERVER_PORT']}"
    pw = stack.airflow_password_file(local_stack["cfg"])
    assert pw.exists() and stat.S_IMODE(pw.stat().st_mode) == 0o600 and _password(local_stack)
    # Everything listens on loopback only.
    for rec in local_stack["records"].values():
        for proc in supervisor.members(rec):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == "LISTEN":
                    assert conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (rec["name"], conn.laddr)


def test_trigger_learn_pipeline_in_the_airflow_ui(local_stack, browser, capsys) -> None:
    d, base = browser, local_stack["urls"]["airflow"]
    d.get(f"{base}/dags/learn_pipeline")
    wait(d, 120, EC.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
    d.find_element(By.NAME, "password").send_keys(_password(local_stack))
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    # The DAG shows up once the dag-processor has parsed dags/ (seconds after start on a quiet machine).
    deadline = time.monotonic() + 240
    while True:
        try:
            wait(d, 20, EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]")))
            break
        except TimeoutException:
            assert time.monotonic() < deadline, "the learn_pipeline DAG never appeared in the Airflow UI"
            d.get(f"{base}/dags/learn_pipeline")
    # The DAG's documentation (its module docstring) is rendered in the UI.
    doc = ast.get_docstring(ast.parse((REPO / "dags" / "learn_pipeline.py").read_text()))
    heading = next(line for line in doc.splitlines() if line.strip()).lstrip("# ").strip()
    d.find_element(By.CSS_SELECTOR, "[data-testid=markdown-button]").click()
    wait(d, 30, lambda d: heading in d.find_element(By.TAG_NAME, "body").text, "the DAG docs are not rendered")
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait(d, 30, lambda d: heading not in " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]")),
         "the DAG docs did not close")
    wait(d, 30, EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))).click()

    # The trigger form is generated from the DAG's Param schemas: every field explains itself.
    dataset = wait(d, 60, EC.visibility_of_element_located((By.NAME, "element_dataset")))
    for name in ("dataset", "window_days", "epochs", "budget_s"):
        field = d.find_element(By.NAME, f"element_{name}")
        helper = d.find_element(By.ID, field.get_attribute("aria-describedby"))
        assert len(helper.text) > 20, f"param {name} has no description in the trigger form"
    # Fill in a small run.
    dataset.send_keys(RUN_PARAMS["dataset"])
    mode = d.find_element(By.XPATH, "//input[@type='hidden' and @name='element_mode']"
                                    "/ancestor::*[.//input[@role='combobox']][1]//input[@role='combobox']")
    mode.send_keys(RUN_PARAMS["mode"])
    wait(d, 10, lambda d: d.find_elements(By.XPATH, f"//*[@role='option' and normalize-space()='{RUN_PARAMS['mode']}']"))
    mode.send_keys(Keys.ENTER)
    wait(d, 10, lambda d: d.find_element(By.NAME, "element_mode").get_attribute("value") == RUN_PARAMS["mode"])
    for name in ("epochs", "budget_s"):
        field = d.find_element(By.NAME, f"element_{name}")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(RUN_PARAMS[name]))
    screenshot(d, local_stack, "airflow-1-trigger-form", capsys)
    d.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]").click()

    # The UI opens the new run; follow it to the end (REST API), then look at it in the UI.
    wait(d, 60, lambda d: "/runs/" in d.current_url, "the UI did not open the triggered run")
    run_id = urllib.parse.unquote(d.current_url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
    run = _airflow_api(local_stack, f"/api/v2/dags/learn_pipeline/dagRuns/{urllib.parse.quote(run_id, safe='')}")
    assert run["conf"] == RUN_PARAMS | {"window_days": 1, "model": None}, run["conf"]  # what the form sent, with the defaults
    result = _wait_for_run(local_stack, run_id)
    assert all(s == "success" for s in result["states"].values()) and "load_milvus" in result["states"]
    _runs["run"] = result

    d.get(d.current_url)
    wait(d, 60, lambda d: "success" in d.find_element(By.TAG_NAME, "body").text.lower(),
         "the run page does not show the run's success")
    screenshot(d, local_stack, "airflow-2-run-succeeded", capsys)


def test_explorer_recommends_and_takes_a_new_item(local_stack, browser, capsys) -> None:
    ensure_pipeline_ran(local_stack)
    d = browser
    d.get(local_stack["urls"]["service"] + "/explorer")
    # The service swaps in the release the run wrote (within serve.release_poll_s).
    wait(d, 240, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true",
         "the explorer never showed a served model")
    users = wait(d, 60, lambda d: len(Select(d.find_element(By.ID, "user-select")).options) > 2
                 and Select(d.find_element(By.ID, "user-select")))
    users.select_by_index(1)  # the most active user
    wait(d, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#recs tbody tr"), "no recommendations shown")
    history = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#history li")]
    assert history, "the user's history is empty"
    assert "personalized" in d.find_element(By.ID, "strategy").text
    rows = d.find_elements(By.CSS_SELECTOR, "#recs tbody tr")
    assert len(rows) == int(d.find_element(By.ID, "k-select").get_attribute("value"))
    scores = [float(r.find_elements(By.TAG_NAME, "td")[3].text) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r.find_elements(By.TAG_NAME, "td")[1].text for r in rows)
    screenshot(d, local_stack, "explorer-1-user", capsys)

    # Look deep into the ranking, then add an item in the user's taste and find it there.
    status = json.load(urllib.request.urlopen(local_stack["urls"]["service"] + "/explorer/api/status", timeout=30))
    Select(d.find_element(By.ID, "k-select")).select_by_value(str(status["max_k"]))
    wait(d, 60, lambda d: f"top {status['max_k']}" in d.find_element(By.ID, "recs-note").text)
    title = history[-1].split(" #")[0].split(" Vol.")[0] + ": New Edition"
    d.find_element(By.ID, "item-title").send_keys(title)
    d.find_element(By.ID, "item-category").send_keys("Books")
    d.find_element(By.ID, "api-token").send_keys(TOKEN)
    d.find_element(By.ID, "add-btn").click()
    wait(d, 120, lambda d: d.find_element(By.ID, "new-item-rank").text, "no answer to adding the item")
    added = d.find_element(By.ID, "add-result").text
    assert "recommendable" in added and title in added, added
    new_id = d.find_element(By.TAG_NAME, "body").get_attribute("data-new-item")
    assert "ranks #" in d.find_element(By.ID, "new-item-rank").text
    row = wait(d, 60, lambda d: d.find_elements(By.CSS_SELECTOR, f"#recs tbody tr[data-item-id='{new_id}']"),
               "the new item is not in the user's recommendations")[0]
    assert row.find_elements(By.TAG_NAME, "td")[1].text == title
    badges = [b.text for b in row.find_elements(By.CSS_SELECTOR, ".badge")]
    assert "new" in badges and "cold-start" in badges, badges
    d.execute_script("arguments[0].scrollIntoView({block: 'end'});", d.find_element(By.ID, "new-item-rank"))
    screenshot(d, local_stack, "explorer-2-item-added", capsys)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
    screenshot(d, local_stack, "explorer-3-new-item-in-ranking", capsys)


def test_evidently_dashboard_shows_the_slice_panels(local_stack, browser, capsys) -> None:
    ensure_pipeline_ran(local_stack)
    d, cfg = browser, local_stack["cfg"]
    project = dashboard.project_name(cfg, DATASET)
    d.get(local_stack["urls"]["evidently"])
    wait(d, 90, EC.element_to_be_clickable((By.LINK_TEXT, project)), f"no project {project!r} in the UI").click()
    spec = dashboard.load_dashboard_spec()
    titles = [p["title"].replace("{k}", str(cfg.monitor.exposure_k)) for tab in spec["tabs"] for p in tab["panels"]]
    slice_titles = [t for t in titles if t.startswith(("Cold-start", "Long-tail"))]
    assert len(slice_titles) >= 4 and "Alert thresholds" in titles
    wait(d, 90, lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in slice_titles + ["Alert thresholds"]),
         "the dashboard does not show every cold-start / long-tail panel and the thresholds")
    body = d.find_element(By.TAG_NAME, "body").text
    assert f"cold_start.event_share.max = {cfg.monitor.cold_start_share_max:g}" in body
    assert f"long_tail.event_share.min = {cfg.monitor.long_tail_share_min:g}" in body
    first = d.find_element(By.XPATH, f"//*[normalize-space()='{slice_titles[0]}']")
    d.set_window_size(1400, 2600)  # a tall window: the cold-start and long-tail panels in one picture
    try:
        d.execute_script("arguments[0].scrollIntoView({block: 'start'});", first)
        time.sleep(1)
        screenshot(d, local_stack, "evidently-dashboard", capsys)
    finally:
        d.set_window_size(1400, 1000)


def test_learn_down_stops_everything(local_stack) -> None:
    down = subprocess.run([LEARN, "down", "--json"], env=local_stack["env"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert down.returncode == 0, down.stderr
    stopped = set(json.loads(down.stdout)["stopped"])
    assert stopped == set(local_stack["records"]), stopped
    for rec in local_stack["records"].values():
        assert processes.alive(rec) is None and not supervisor.members(rec), rec["name"]
    st = subprocess.run([LEARN, "status", "--json"], env=local_stack["env"], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
    assert st.returncode == 3 and not json.loads(st.stdout)["any_running"]
