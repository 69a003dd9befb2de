"""Benchmark: the closed loop. Events acknowledged by the service reach the pipeline's landing exactly once,
even across a kill -9 of the service; the service follows a new release without a failed request; items
added online are recommendable.

Steps, in a work folder of its own (``<home>-loop-bench``, rebuilt on every run):

1. a generated dataset (``learn_tasks.data.synth``), content embeddings, a briefly trained model of the
   default kind, Feast features, the Milvus collection and its release; the local Milvus Lite server
   (``learn index server start``) holds the index so the service and this process share it;
2. ``learn serve`` as a child process; ``POST /events`` from 8 threads with client event ids (a request
   that fails in transport is sent again with the same ids, as a client would); halfway through the
   service is killed with SIGKILL, restarted, and the events go on;
3. event to online feature: for fresh users, the time from sending one event to the first
   ``GET /recommendations`` that reads it (a personalized answer);
4. landing: the pipeline's landing step (``land`` of an incremental run over the event log) and a count
   of every acknowledged event id in the landed files (``lost``: acknowledged, not landed;
   ``duplicated``: landed more than once);
5. new items: ``POST /items`` with the text of popular catalogue items, then a seeded
   ``GET /recommendations`` of the original must list the new one;
6. release switch: while 4 threads request recommendations, a second model is indexed and released;
   ``release_switch_s`` = from the release record's time to the first response from the new model,
   ``failed_requests_during_switch`` = non-200 answers or transport errors meanwhile.

``--profile production``: the event log in PostgreSQL (a database of its own on 127.0.0.1:5432, dropped
and created), the online store in Redis (127.0.0.1:6379, database 9, flushed first) with the Feast
registry in PostgreSQL (database ``learn_loop_bench_feast``).

Writes ``bench/results/loop.json`` and ``bench/results/loop_<profile>.json``: the keys in ``KEYS``, the
profile, and the hygiene keys (``noisy``, ``load_avg``, ``commit``, ``command``); the details go to stderr. Usage: python bench/loop.py [--quick] [--profile embedded|production]
[--home DIR] [--events N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)
from hygiene import free_port, log, pct  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "loop.json"
DATASET = "synth"
PG_DB = "learn_loop_bench"
REDIS_DB = 9
KEYS = ("events_sent", "events_acked", "events_landed", "lost", "duplicated", "ack_p50_ms", "ack_p99_ms",
        "events_per_s", "feature_visible_ms_p99", "release_switch_s", "failed_requests_during_switch",
        "new_item_hits", "new_item_total")




# -------------------------------------------------------------------------------------------- stack
def profile_env(profile: str) -> dict[str, str]:
    if profile == "embedded":
        return {}
    import psycopg2

    conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in (PG_DB, PG_DB + "_feast"):
                cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                cur.execute(f"CREATE DATABASE {db}")
    finally:
        conn.close()
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    return {"LEARN_EVENTLOG__BACKEND": "postgres",
            "LEARN_EVENTLOG__URL": f"postgresql://postgres@127.0.0.1:5432/{PG_DB}",
            "LEARN_FEATURES__ONLINE_STORE": "redis", "LEARN_FEATURES__REGISTRY": "sql",
            "LEARN_FEATURES__REGISTRY_URL": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{PG_DB}_feast",
            "LEARN_FEATURES__REDIS_URL": f"127.0.0.1:6379,db={REDIS_DB}"}


def prepare(cfg, quick: bool) -> dict:
    """Data, embeddings, two models (the second released later), features, index and the first release."""
    from learn_tasks.ceg import encode
    from learn_tasks.data import datasets as data
    from learn_tasks.data import synth
    from learn_tasks.online import features, index
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    spec = synth.SynthSpec(n_users=300, n_items=400) if quick else synth.SynthSpec(n_users=3000, n_items=4000)
    src = synth.write_seqrec(cfg.paths.home / "src", spec)
    data.prepare_dataset(cfg, "seqrec", src, DATASET)
    encode.encode_catalogue(cfg, DATASET)
    first = train.train_model(cfg, DATASET, epochs=1)
    second = train.train_model(cfg, DATASET, epochs=1, warm_start=first["run_dir"])
    registry.promote(cfg, DATASET, Path(first["run_dir"]), reason="bench/loop.py")
    features.materialize_features(cfg, DATASET)
    built = index.index_catalogue(cfg, DATASET)
    return {"first": Path(first["run_dir"]).name, "second": second["run_dir"], "rows": built["rows"]}


def start_service(home: Path, env: dict, port: int, token: str, timeout_s: float = 300.0) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "learn_tasks.cli", "serve", "--dataset", DATASET, "--host", "127.0.0.1",
           "--port", str(port)]
    logf = open(home / "bench-serve.log", "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "LEARN_HOME": str(home),
                                                "LEARN_API_TOKEN": token},
                            stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}; see {home / 'bench-serve.log'}")
        try:
            h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if h.status_code == 200 and h.json().get("status") == "ok":
                return proc
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"service not healthy within {timeout_s:.0f} s")


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -------------------------------------------------------------------------------------------- events
class EventDriver:
    """POST /events batches from ``threads`` threads; a transport failure resends the same event ids."""

    def __init__(self, base: str, token: str, users: list[int], items: list[int], batch: int = 5):
        self.base, self.headers = base, {"Authorization": f"Bearer {token}"}
        self.users, self.items, self.batch = users, items, batch
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self.rejected: list[dict] = []
        self.ack_ms: list[float] = []
        self.lock = threading.Lock()
        self.n = 0
        self.resent = 0  # batches sent again after a transport error or a 503 (the kill -9)

    def _next(self) -> list[dict]:
        with self.lock:
            lo, self.n = self.n, self.n + self.batch
        rng = np.random.default_rng(lo)
        return [{"user_id": int(rng.choice(self.users)), "item_id": int(rng.choice(self.items)),
                 "event_id": f"loop-{i:08d}"} for i in range(lo, lo + self.batch)]

    def send(self, client, events: list[dict], deadline: float) -> None:
        import httpx

        while time.monotonic() < deadline:
            with self.lock:
                self.sent.update(e["event_id"] for e in events)
            t0 = time.perf_counter()
            try:
                r = client.post("/events", json={"events": events}, headers=self.headers)
            except httpx.HTTPError:
                with self.lock:
                    self.resent += 1
                time.sleep(0.2)  # the service is down (killed): resend the same ids
                continue
            if r.status_code == 202:
                body = r.json()
                with self.lock:
                    self.ack_ms.append(1000 * (time.perf_counter() - t0))
                    self.acked.update(body["event_ids"])
                    self.rejected.extend(body["rejected"])
                return
            with self.lock:
                self.resent += 1
            time.sleep(0.2)  # 503 while starting: resend
        return

    def drive(self, seconds: float, threads: int, limit: int) -> float:
        import httpx

        deadline = time.monotonic() + seconds

        def worker() -> None:
            with httpx.Client(base_url=self.base, timeout=10) as client:
                while time.monotonic() < deadline and self.n < limit:
                    self.send(client, self._next(), deadline + 60)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0


def feature_visible(base: str, token: str, items: list[int], n: int) -> list[float]:
    """Send one event for a fresh user, then poll its recommendations until they are personalized."""
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for i in range(n):
            user = 5 * 10**11 + i
            t0 = time.perf_counter()
            r = client.post("/events", json={"user_id": user, "item_id": items[i % len(items)]},
                            headers={"Authorization": f"Bearer {token}"})
            if r.status_code != 202:
                continue
            while time.perf_counter() - t0 < 10:
                if client.get(f"/recommendations/{user}", params={"k": 5}).json().get("strategy") == "personalized":
                    out.append(1000 * (time.perf_counter() - t0))
                    break
    return out


def new_items(base: str, token: str, seeds: list[tuple[int, str]]) -> int:
    import httpx

    hits = 0
    with httpx.Client(base_url=base, timeout=30) as client:
        for seed, title in seeds:
            r = client.post("/items", json={"title": title}, headers={"Authorization": f"Bearer {token}"})
            if r.status_code != 201:
                continue
            got = client.get(f"/recommendations/{10**15 + seed}", params={"k": 10, "seed_item": seed}).json()
            hits += int(r.json()["item_id"] in [i["item_id"] for i in got.get("items", [])])
    return hits


def switch(cfg, base: str, users: list[int], second_run: str) -> dict:
    """Release the second model while 4 threads request recommendations."""
    import httpx

    from learn_tasks.online import index, releases
    from learn_tasks.pch import registry

    new_version = Path(second_run).name
    stop = threading.Event()
    seen: list[tuple[float, str | None, int]] = []  # (wall time, model_version, status)
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            i = k
            while not stop.is_set():
                try:
                    r = client.get(f"/recommendations/{users[i % len(users)]}", params={"k": 10})
                    mv = r.json().get("model_version") if r.status_code == 200 else None
                    status = r.status_code
                except httpx.HTTPError:
                    mv, status = None, 0
                with lock:
                    seen.append((time.time(), mv, status))
                i += 4

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    registry.promote(cfg, DATASET, Path(second_run), reason="bench/loop.py switch")
    index.index_catalogue(cfg, DATASET, run_dir=second_run)
    rel = releases.current(cfg, DATASET)
    released = datetime.fromisoformat(rel["released_at"]).timestamp()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if any(mv == new_version for _, mv, _ in seen):
                break
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in ts:
        t.join()
    first_new = min((w for w, mv, _ in seen if mv == new_version), default=None)
    return {"release_switch_s": (first_new - released) if first_new and released else None,
            "failed_requests_during_switch": sum(1 for _, _, s in seen if s != 200),
            "switch_requests": len(seen), "released_version": new_version,
            "switched": first_new is not None and rel["model_version"] == new_version}


def landed_ids(cfg) -> tuple[list[str], dict]:
    """Land the event log as an incremental pipeline run does; every landed event id."""
    import pandas as pd

    from learn_tasks.orchestration import landing
    from learn_tasks.orchestration.runs import RunArgs

    now = pd.Timestamp.now(tz="UTC")
    a = RunArgs(dataset=DATASET, mode="incremental", start=now.floor("D"), end=now.floor("D") + pd.Timedelta(days=1))
    res = landing.land(cfg, a, kinds=("interactions",))
    ids: list[str] = []
    for p in landing.landed_files(landing.landing_dir(cfg, a), "interactions"):
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
            if "event_id" in df:
                ids += df["event_id"].astype(str).tolist()
    return ids, res.get("event_log", {})


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small bounded run (a few minutes)")
    ap.add_argument("--profile", default="embedded", choices=["embedded", "production"])
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"))
    ap.add_argument("--events", type=int, default=None, help="events to send (upper bound)")
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    n_events = args.events or (2000 if args.quick else 20000)
    seconds = 20.0 if args.quick else 120.0

    work = Path(args.home).resolve().with_name(Path(args.home).name + f"-loop-bench-{args.profile}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = profile_env(args.profile)
    os.environ.update(env)
    os.environ["LEARN_HOME"] = str(work)
    from learn_tasks import schema as S
    from learn_tasks.config import load_settings
    from learn_tasks.data import datasets as data
    from learn_tasks.online import index, milvus_server

    cfg = load_settings()
    t_start = time.perf_counter()
    log(f"preparing {DATASET} in {work} ({args.profile})")
    prep = prepare(cfg, args.quick)
    index.close(cfg)
    milvus_server.start(cfg, port=free_port())
    run = hygiene.begin(args, say=log)  # the measured part: the service, events, landing, new items, switch
    proc = None
    try:
        inter = data.load_interactions(cfg, DATASET)
        items = data.load_items(cfg, DATASET)
        users = inter[S.USER_ID].unique().tolist()
        popular = inter[S.ITEM_ID].value_counts().index[:30].tolist()
        port, token = free_port(), secrets.token_hex(16)
        base = f"http://127.0.0.1:{port}"
        proc = start_service(work, env, port, token)
        driver = EventDriver(base, token, users, items[S.ITEM_ID].tolist())
        log(f"events, 8 threads, {seconds / 2:.0f} s; then kill -9 of the service")
        wall1 = driver.drive(seconds / 2, 8, n_events // 3)
        killer_done = threading.Event()

        def killer() -> None:
            time.sleep(1.0)
            run.before_kill(proc.pid)  # its worker processes' CPU is ours, though no one will wait for them
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killer_done.set()

        k = threading.Thread(target=killer)
        k.start()
        during = threading.Thread(target=driver.drive, args=(3.0, 8, 2 * n_events // 3))
        during.start()
        k.join()
        proc = start_service(work, env, port, token)
        during.join()
        log("events after the restart")
        wall2 = driver.drive(seconds / 2, 8, n_events)
        fv = feature_visible(base, token, popular, 10 if args.quick else 50)
        titles = items.set_index(S.ITEM_ID)[S.TITLE]
        seeds = [(int(i), str(titles.get(i))) for i in popular[:3 if args.quick else 10]]
        log("new items")
        hits = new_items(base, token, seeds)
        log("release switch")
        sw = switch(cfg, base, users, prep["second"])
    finally:
        if proc is not None:
            stop_service(proc)
        index.close(cfg)
        milvus_server.stop(cfg)
    log("landing the event log")
    ids, landed = landed_ids(cfg)
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    ours = {i: c for i, c in counts.items() if i.startswith("loop-")}
    result = {
        "events_sent": len(driver.sent), "events_acked": len(driver.acked),
        "events_landed": len(ours), "lost": len(driver.acked - set(ours)),
        "duplicated": sum(1 for c in ours.values() if c > 1),
        "ack_p50_ms": pct(driver.ack_ms, 50), "ack_p99_ms": pct(driver.ack_ms, 99),
        "events_per_s": len(driver.acked) / (wall1 + wall2) if wall1 + wall2 else None,
        "feature_visible_ms_p99": pct(fv, 99),
        "release_switch_s": sw["release_switch_s"], "failed_requests_during_switch": sw["failed_requests_during_switch"],
        "new_item_hits": hits, "new_item_total": len(seeds),
    }
    details = {"profile": args.profile, "quick": args.quick, "kills": 1, "resent_batches": driver.resent, "rejected": len(driver.rejected),
               "rejected_without_reason": sum(1 for r in driver.rejected if not r.get("reason")),
               "landing": landed, "switch": sw, "prepared": {k: v for k, v in prep.items() if k != "second"},
               "wall_s": time.perf_counter() - t_start, "machine": platform.platform(),
               "cpus": os.cpu_count()}
    assert tuple(result) == KEYS
    result.update({"profile": args.profile, "quick": args.quick, "kills": 1,
                   "rejected_without_reason": details["rejected_without_reason"], **run.finish()})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    RESULTS.write_text(text)
    # Each profile's latest run is also kept under its own name, so both can be committed side by side.
    RESULTS.with_name(f"loop_{args.profile}.json").write_text(text)
    log("details: " + json.dumps(details, default=str))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
