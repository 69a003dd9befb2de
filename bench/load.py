"""Load test: the recommendation service under a bounded, mixed loopback load for about a minute.

The service is started exactly as ``bench/serve.py`` starts it (its ``prepare``/``start_service``/
``stop_service`` are imported, not copied): ``learn serve`` as a child process on 127.0.0.1 with the
promoted model of the dataset, Feast features and the Milvus index. This process then drives it from
``--concurrency`` threads for ``--duration`` seconds (and at most ``--max-requests`` requests) with a
weighted mix of what production sees:

* ``GET /recommendations/{user}`` for known users (k = 10 or 50), and for unknown users with and
  without a ``seed_item`` (the labelled fallbacks);
* ``POST /events`` with the token; ``POST /items`` with the token (a new item: encoded, indexed, searchable);
* unauthenticated writes, which must be refused with 401 while the service is busy;
* ``GET /health`` and ``GET /metrics``.

Every response whose status is not the expected one, and every transport error or timeout, is an error.
The service's resident memory and threads are sampled before and after, and ``/health`` must still be ok
at the end. Writes ``bench/results/load.json``; the target is zero errors.

Usage: python bench/load.py [--quick] [--home DIR] [--dataset NAME] [--duration S] [--concurrency N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import secrets
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)
RESULTS = ROOT / "bench" / "results" / "load.json"


def _serve_bench():
    """bench/serve.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sb = _serve_bench()
log, pct = sb.log, sb.pct

# (name, weight): the request mix
MIX = [("recommend_known", 60), ("recommend_known_k50", 8), ("recommend_unknown", 5), ("recommend_seeded", 5),
       ("event", 12), ("new_item", 1), ("write_without_token", 3), ("health", 4), ("metrics", 2)]
EXPECTED = {"recommend_known": 200, "recommend_known_k50": 200, "recommend_unknown": 200, "recommend_seeded": 200,
            "event": 202, "new_item": 201, "write_without_token": 401, "health": 200, "metrics": 200}


def work_home(home: Path, suffix: str, linked: tuple[str, ...] = ("data", "embeddings")) -> Path:
    """A state folder beside LEARN_HOME with LEARN_HOME's prepared data and content embeddings linked in.

    Its own Feast store, Milvus data and model registry: items and events added by the load never reach
    the shared catalogue, and the model it trains when none is promoted here is not promoted there."""
    work = home.with_name(home.name + suffix)
    for sub in linked:
        (home / sub).mkdir(parents=True, exist_ok=True)
        link = work / sub
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(home.resolve() / sub, target_is_directory=True)
    return work


def process_stats(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    with p.oneshot():
        return {"rss_mb": p.memory_info().rss / 2**20, "threads": p.num_threads(),
                "open_files": len(p.open_files()), "connections": len(p.net_connections())}


def drive_mix(base: str, token: str, users: list[int], items: list[int], titles: list[str], concurrency: int,
              duration_s: float, max_requests: int, seed: int = 0) -> dict:
    """Run the weighted mix from ``concurrency`` threads until the time or the request budget runs out."""
    import httpx

    names = [n for n, _ in MIX]
    weights = np.array([w for _, w in MIX], float)
    weights /= weights.sum()
    lock = threading.Lock()
    lat: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    errors: list[dict] = []
    issued = [0]
    new_ids: list[int] = []
    deadline = time.monotonic() + duration_s
    auth = {"Authorization": f"Bearer {token}"}

    def one(client: httpx.Client, rng: np.random.Generator, kind: str) -> httpx.Response:
        user = int(users[rng.integers(len(users))])
        item = int(items[rng.integers(len(items))])
        if kind == "recommend_known":
            return client.get(f"/recommendations/{user}", params={"k": 10})
        if kind == "recommend_known_k50":
            return client.get(f"/recommendations/{user}", params={"k": 50})
        if kind == "recommend_unknown":
            return client.get(f"/recommendations/{10**15 + int(rng.integers(10**6))}", params={"k": 10})
        if kind == "recommend_seeded":
            return client.get(f"/recommendations/{10**15 + int(rng.integers(10**6))}",
                              params={"k": 10, "seed_item": item})
        if kind == "event":
            return client.post("/events", json={"user_id": user, "item_id": item}, headers=auth)
        if kind == "new_item":
            title = f"{titles[rng.integers(len(titles))]} (load test edition {rng.integers(10**9)})"
            return client.post("/items", json={"title": title, "category": "Books"}, headers=auth)
        if kind == "write_without_token":
            if rng.random() < 0.5:
                return client.post("/events", json={"user_id": user, "item_id": item})
            return client.post("/items", json={"title": "should be refused"}, headers={"Authorization": "Bearer nope"})
        if kind == "health":
            return client.get("/health")
        return client.get("/metrics")

    def worker(wid: int) -> None:
        rng = np.random.default_rng(seed + wid)
        with httpx.Client(base_url=base, timeout=30) as client:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                kind = names[rng.choice(len(names), p=weights)]
                t0 = time.perf_counter()
                try:
                    r = one(client, rng, kind)
                    dt = 1000 * (time.perf_counter() - t0)
                    with lock:
                        counts[kind] += 1
                        if r.status_code == EXPECTED[kind]:
                            lat[kind].append(dt)
                            if kind == "new_item":
                                new_ids.append(int(r.json()["item_id"]))
                        else:
                            errors.append({"kind": kind, "status": r.status_code, "body": r.text[:300]})
                except httpx.HTTPError as exc:
                    with lock:
                        counts[kind] += 1
                        errors.append({"kind": kind, "status": None, "body": f"{type(exc).__name__}: {exc}"[:300]})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(counts.values())
    per_kind = {k: {"requests": counts[k], "ok": len(lat[k]), "p50_ms": pct(lat[k], 50), "p95_ms": pct(lat[k], 95),
                    "p99_ms": pct(lat[k], 99), "max_ms": max(lat[k], default=None)} for k in names}
    reads = [x for k in names if k.startswith("recommend") for x in lat[k]]
    return {"requests": total, "errors": len(errors), "error_samples": errors[:10], "wall_s": wall,
            "rps": total / wall if wall else None, "recommend_p50_ms": pct(reads, 50),
            "recommend_p95_ms": pct(reads, 95), "recommend_p99_ms": pct(reads, 99), "per_kind": per_kind,
            "new_items_added": len(new_ids), "new_item_ids": new_ids[:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s instead of a minute")
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"))
    ap.add_argument("--dataset", default="amazon-books-2014-sample")
    ap.add_argument("--search", default="replica", choices=["replica", "milvus"])
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 60, --quick 20)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=200_000, help="upper bound on requests")
    ap.add_argument("--train-budget-s", type=float, default=120.0, help="only when no model is promoted")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    duration = args.duration or (20.0 if args.quick else 60.0)

    home = Path(args.home)
    work = work_home(home, "-load-bench")
    os.environ["LEARN_HOME"] = str(work)
    from learn_tasks import schema as S
    from learn_tasks.data import datasets as data
    from learn_tasks.config import load_settings
    from learn_tasks.storage import write_json

    cfg = load_settings()
    t_start = time.perf_counter()
    prep = sb.prepare(cfg, args.dataset, args.train_budget_s)
    from learn_tasks.online import index

    index.close(cfg)  # release in-process Milvus Lite: the service process opens it next
    inter = data.load_interactions(cfg, args.dataset)
    catalogue = data.load_items(cfg, args.dataset)
    rng = np.random.default_rng(0)
    users = rng.choice(inter[S.USER_ID].unique(), size=min(5000, inter[S.USER_ID].nunique()), replace=False).tolist()
    items = catalogue[S.ITEM_ID].to_numpy()[:50_000].tolist()
    titles = catalogue[S.TITLE].astype(str).to_numpy()[:1000].tolist()

    run = hygiene.begin(args, say=log)  # the measured part: the service under load (after preparation)
    port, token = sb.free_port(), secrets.token_hex(16)
    log(f"starting the service on 127.0.0.1:{port} (search={args.search})")
    proc = sb.start_service(str(work), args.dataset, port, token, args.search, args.startup_timeout_s)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        sb.drive(base, users[:50], 1, 50, 30.0)  # warm-up (not counted)
        before = process_stats(proc.pid)
        log(f"load: {args.concurrency} threads, {duration:.0f} s, at most {args.max_requests} requests")
        load = drive_mix(base, token, users, items, titles, args.concurrency, duration, args.max_requests)
        after = process_stats(proc.pid)
        health = httpx.get(f"{base}/health", timeout=10)
        health_ok = health.status_code == 200 and health.json().get("status") == "ok"
        still_serves = httpx.get(f"{base}/recommendations/{users[0]}", params={"k": 10}, timeout=10).status_code == 200
    finally:
        sb.stop_service(proc)
    exit_code = proc.returncode

    result = {
        "errors": load["errors"] + (0 if health_ok else 1) + (0 if still_serves else 1),
        "requests": load["requests"], "rps": load["rps"], "duration_s": load["wall_s"],
        "concurrency": args.concurrency, "recommend_p50_ms": load["recommend_p50_ms"],
        "recommend_p95_ms": load["recommend_p95_ms"], "recommend_p99_ms": load["recommend_p99_ms"],
        "health_ok_after": health_ok, "serves_after": still_serves,
        "service_before": before, "service_after": after,
        "rss_growth_mb": after["rss_mb"] - before["rss_mb"], "service_exit_code": exit_code,
        "load": load, "mix": dict(MIX), "expected_status": EXPECTED, "search": args.search,
        "dataset": args.dataset, "model_version": prep["model_version"], "work_dir": str(work),
        "target": {"errors": 0}, "meets_target": load["errors"] == 0 and health_ok and still_serves,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), "platform": platform.platform()},
        "total_s": time.perf_counter() - t_start,
        "notes": "loopback only; driver and service share this machine's CPUs (driver = this process).",
    }
    result.update(run.finish())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, RESULTS)
    log(f"wrote {RESULTS}")
    print(json.dumps({k: result[k] for k in ("errors", "requests", "rps", "duration_s", "recommend_p50_ms",
                                             "recommend_p99_ms", "rss_growth_mb", "meets_target")}, indent=2))
    sys.exit(0 if result["meets_target"] else 1)


if __name__ == "__main__":
    main()
