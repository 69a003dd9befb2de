"""Benchmark: the recommendation service on loopback with the model trained on the Amazon Books sample.

Steps (each reuses what LEARN_HOME already has):

1. content embeddings (``learn encode``), a promoted model (``learn train --budget-s``; trained only when
   none is promoted), Feast features (``learn features``) and the Milvus index (``learn index``);
2. index check in this process: Milvus search latency and recall@10 against exact numpy search, on user
   embeddings of sampled users (the queries the service really sends); then the index is released;
3. ``learn serve`` is started as a child process on 127.0.0.1 and driven from this process over HTTP:
   latency p50/p95/p99 and requests/s at concurrency 1 and 8 (bounded by a request count and a time
   limit), errors (non-2xx or transport errors), ``POST /events`` latency, and new-item time to
   recommendable: from sending ``POST /items`` (a new edition of a catalogue book) until a
   ``GET /recommendations`` seeded with the original book returns the new one.
   The service's own per-stage timings (Feast read, user tower, search) are reported beside the
   client-side latencies.

Writes ``bench/results/serve.json``. Targets: p99 <= 50 ms at concurrency 1, zero errors, a new item
recommendable in < 1 s.

Usage: python bench/serve.py [--quick] [--home DIR] [--dataset NAME] [--search replica|milvus]
       [--requests N] [--duration S] [--train-budget-s S]
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
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)
from hygiene import free_port, log, pct  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "serve.json"
TARGETS = {"p99_ms": 50.0, "errors": 0, "new_item_s": 1.0}




# -------------------------------------------------------------------------------------------- prepare
def prepare(cfg, dataset: str, train_budget_s: float) -> dict:
    """Embeddings, promoted model, features and index: made only when missing or out of date."""
    from learn_tasks.ceg import encode, store
    from learn_tasks.online import features
    from learn_tasks.online import index
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    out: dict = {}
    from learn_tasks.data import public

    if dataset in public.DATASETS:  # a registered public dataset: fetch and prepare it when missing
        public.ensure_prepared(cfg, dataset)
    if store.current_fingerprint(cfg, dataset) is None:
        log(f"encoding {dataset} (once)")
        out["encode"] = encode.encode_catalogue(cfg, dataset)
    run_dir = registry.promoted(cfg, dataset)
    if run_dir is None:
        log(f"training a model for {train_budget_s:.0f} s (none promoted yet)")
        res = train.train_model(cfg, dataset, budget_s=train_budget_s)
        run_dir = registry.promote(cfg, dataset, Path(res["run_dir"]), reason="bench/serve.py")
        out["trained"] = {k: res.get(k) for k in ("run_id", "epochs_run", "stopped", "train_seconds", "val")}
    out["model_version"] = run_dir.name
    log("features (idempotent)")
    t0 = time.perf_counter()
    out["features"] = {k: v for k, v in features.materialize_features(cfg, dataset).items() if k in ("rows", "rebuilt", "materialized")}
    out["features"]["seconds"] = time.perf_counter() - t0
    if index.current(cfg, dataset) != index.collection_name(dataset, run_dir.name):
        log("indexing the promoted model's items")
        t0 = time.perf_counter()
        built = index.index_catalogue(cfg, dataset)
        out["index_build"] = {k: built[k] for k in ("rows", "index_type", "index_recall_at_10", "load_s", "skipped")}
        out["index_build"]["seconds"] = time.perf_counter() - t0
    return out


def index_check(cfg, dataset: str, n_queries: int, n_latency: int) -> dict:
    """Milvus search latency and recall@10 against exact numpy search, on real user embeddings."""
    from learn_tasks.data import datasets as data
    from learn_tasks.online import index
    from learn_tasks.pch import registry
    from learn_tasks.online.bundle import ModelBundle

    client = index.connect(cfg)
    target = index.current(cfg, dataset)
    everything = index.fetch_all(client, target)
    bundle = ModelBundle.load(cfg, dataset, registry.promoted(cfg, dataset))
    queries = bundle.sample_user_vectors(data.load_interactions(cfg, dataset), n_queries, seed=1)
    rec = index.measure_recall(client, target, everything, queries, k=10, search_params=cfg.index.search_params)
    milvus_ms, exact_ms = [], []
    for q in queries[:n_latency]:
        t0 = time.perf_counter()
        index.search(client, target, q[None], 10, search_params=cfg.index.search_params, output_fields=())
        milvus_ms.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        index.exact_topk(everything.vectors, q[None], 10)
        exact_ms.append(1000 * (time.perf_counter() - t0))
    index.close(cfg)  # release Milvus Lite for the service process
    twins = twin_exposure(bundle, everything, queries)
    return {**twins, "index_recall_at_10": rec["recall_at_10"], "recall_queries": rec["queries"], "index_rows": len(everything),
            "index_type": index.index_type_for(cfg, len(everything)), "index_search_ms_p50": pct(milvus_ms, 50),
            "index_search_ms_p99": pct(milvus_ms, 99), "exact_numpy_search_ms_p50": pct(exact_ms, 50),
            "exact_numpy_search_ms_p99": pct(exact_ms, 99), "latency_queries": len(milvus_ms)}


def twin_exposure(bundle, everything, queries: np.ndarray, k: int = 10) -> dict:
    """Do new items reach personalized lists like warm items of the same content?

    For each user query, every warm item in its top-k gets a twin: the same content embedding, but
    embedded as an item the model never saw (as ``POST /items`` does). The twin's rank among the
    catalogue tells whether it would be shown in the original's place: ``new_item_twin_topk_rate`` is
    the share of (user, item) pairs whose twin also ranks in the top-k (1.0 = new items are shown
    exactly as often as warm items of the same content; a content-only model scores 1.0 by design).
    """
    if not bundle.uses_content:
        return {"new_item_twin_topk_rate": None, "new_item_twin_pairs": 0, "new_item_twin_median_rank": None}  # ID-only
    scores = queries @ everything.vectors.T  # [Q, N]
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
    in_top, ranks = 0, []
    for q, rows in enumerate(top):
        ids = everything.item_ids[rows]
        warm = [r for r, i in zip(rows, ids) if bundle.vocab.get(int(i), 0) > 0 and bundle.knows(int(i))]
        if not warm:
            continue
        twins = bundle.new_item_vectors(bundle.content_rows(everything.item_ids[warm]))  # [W, d]
        kth = scores[q, rows[-1]]
        for t in twins @ queries[q]:
            ranks.append(int((scores[q] > t).sum()) + 1)
            in_top += bool(t >= kth)
    return {"new_item_twin_topk_rate": in_top / len(ranks) if ranks else None, "new_item_twin_pairs": len(ranks),
            "new_item_twin_median_rank": float(np.median(ranks)) if ranks else None, "new_item_twin_k": k}


# -------------------------------------------------------------------------------------------- service
def start_service(home: str, dataset: str, port: int, token: str, search: str, timeout_s: float,
                  workers: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "LEARN_HOME": home, "LEARN_API_TOKEN": token}
    cmd = [sys.executable, "-m", "learn_tasks.cli", "serve", "--dataset", dataset, "--host", "127.0.0.1",
           "--port", str(port), "--search", search] + (["--workers", str(workers)] if workers else [])
    logf = open(Path(home) / "bench-serve.log", "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}; see {Path(home) / 'bench-serve.log'}")
        try:
            # 200 "degraded" = up without a model (popular items answer): wait for the release to load. Each
            # call is a new connection, which any worker process may accept: with several workers, all must
            # answer "ok", so ask until many in a row do.
            for _ in range(1 if (workers or 1) <= 1 else 8 * workers):
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code != 200 or health.json().get("status") != "ok":
                    break
            else:
                return proc
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    stop_service(proc)
    raise RuntimeError(f"service not healthy within {timeout_s:.0f} s")


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def drive(base: str, users: list[int], concurrency: int, n_requests: int, duration_s: float, k: int = 10) -> dict:
    """GET /recommendations for ``users`` round-robin over ``concurrency`` keep-alive connections; bounded by
    count and time.

    The client is one asyncio loop speaking HTTP/1.1 over raw streams: a request costs it tens of
    microseconds of CPU, so on a machine of two cores the figures describe the service, not the client
    (a thread pool of httpx clients spent about as much CPU per request as the service itself).
    """
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(base)
    lat: list[float] = []
    server: dict[str, list[float]] = {}  # the service's own timing of each stage
    errors: list[str] = []
    strategies: dict[str, int] = {}
    counter = iter(range(n_requests))
    deadline = time.monotonic() + duration_s

    async def one(reader, writer, path: str) -> tuple[int, bytes]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next((int(v) for n, _, v in (h.partition(":") for h in lines[1:]) if n.lower() == "content-length"),
                      None)
        if length is None:
            raise ValueError(f"response without content-length: {lines[:3]}")
        return status, await reader.readexactly(length)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while time.monotonic() < deadline:
                i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, body = await one(reader, writer, f"/recommendations/{users[i % len(users)]}?k={k}")
                except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    writer.close()
                    reader, writer = await asyncio.open_connection(url.hostname, url.port)
                    continue
                dt = time.perf_counter() - t0
                if status == 200:
                    lat.append(1000 * dt)
                    doc = json.loads(body)
                    strategies[doc["strategy"]] = strategies.get(doc["strategy"], 0) + 1
                    for stage, ms in doc.get("timing_ms", {}).items():
                        server.setdefault(stage, []).append(ms)
                else:
                    errors.append(f"{status}: {body[:200]!r}")
        finally:
            writer.close()

    async def all_workers() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(all_workers())
    wall = time.perf_counter() - t0
    return {"requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors), "error_samples": errors[:5],
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=None),
            "rps": len(lat) / wall if wall else None, "wall_s": wall, "strategies": strategies,
            "client": "asyncio HTTP/1.1 keep-alive",
            "server_ms": {stage: {"p50": pct(v, 50), "p99": pct(v, 99)} for stage, v in server.items()}}


def new_item_times(base: str, token: str, seeds: list[tuple[int, str]], timeout_s: float = 5.0) -> dict:
    """Send POST /items, then poll a seeded recommendation until the new item shows up."""
    import httpx

    client_s, server_s, misses = [], [], 0
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=30) as client:
        for seed, title in seeds:
            t0 = time.perf_counter()
            # A new edition: the same text as the seed book, so its nearest neighbour is the seed.
            r = client.post("/items", json={"title": title}, headers=headers)
            if r.status_code != 201:
                misses += 1
                continue
            body = r.json()
            server_s.append(body["time_to_recommendable_s"])
            while time.perf_counter() - t0 < timeout_s:
                rec = client.get(f"/recommendations/{10**15 + seed}", params={"k": 10, "seed_item": seed}).json()
                if body["item_id"] in [i["item_id"] for i in rec.get("items", [])]:
                    client_s.append(time.perf_counter() - t0)
                    break
            else:
                misses += 1
    return {"new_item_s": pct(client_s, 50), "new_item_s_max": max(client_s, default=None),
            "new_item_server_s": pct(server_s, 50), "new_items": len(seeds), "new_item_misses": misses}


def event_times(base: str, token: str, pairs: list[tuple[int, int]]) -> dict:
    import httpx

    lat, errors = [], 0
    with httpx.Client(base_url=base, timeout=30) as client:
        for user, item in pairs:
            t0 = time.perf_counter()
            r = client.post("/events", json={"user_id": user, "item_id": item},
                            headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 202:
                lat.append(1000 * (time.perf_counter() - t0))
            else:
                errors += 1
    return {"events_p50_ms": pct(lat, 50), "events_p99_ms": pct(lat, 99), "event_errors": errors}


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small bounded run (minutes)")
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"))
    ap.add_argument("--dataset", default="amazon-books-2014-sample")
    ap.add_argument("--search", default="replica", choices=["replica", "milvus"])
    ap.add_argument("--workers", type=int, default=None, help="service worker processes (default serve.workers: one per core)")
    ap.add_argument("--requests", type=int, default=None, help="requests per concurrency level")
    ap.add_argument("--duration", type=float, default=None, help="seconds per concurrency level (upper bound)")
    ap.add_argument("--train-budget-s", type=float, default=120.0)
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    n_req = args.requests or (1000 if args.quick else 3000)
    duration = args.duration or (40.0 if args.quick else 120.0)

    # The service's own state (Feast store, Milvus data, items added by this benchmark) lives in a work
    # folder beside LEARN_HOME, so benchmark items never leak into the shared catalogue; the prepared data,
    # content embeddings and models are LEARN_HOME's own, linked in.
    work = Path(args.home).with_name(Path(args.home).name + "-serve-bench")
    for sub in ("data", "embeddings", "models"):
        (Path(args.home) / sub).mkdir(parents=True, exist_ok=True)
        link = work / sub
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(args.home).resolve() / sub, target_is_directory=True)
    # Each run starts from the prepared data alone: the items and events an earlier run posted would
    # otherwise pile up (new editions of the same seed books crowding each other out of its top-10).
    os.environ["LEARN_HOME"] = str(work)
    from learn_tasks.config import load_settings
    from learn_tasks.online import milvus_server

    milvus_server.stop(load_settings())  # a local Milvus Lite server left by a killed service of an earlier run
    for sub in ("eventlog", "feast", "milvus", "serve", "locks"):
        shutil.rmtree(work / sub, ignore_errors=True)
    from learn_tasks import schema as S
    from learn_tasks.data import datasets as data

    cfg = load_settings()
    t_start = time.perf_counter()
    prep = prepare(cfg, args.dataset, args.train_budget_s)
    log("index check (Milvus vs exact numpy)")
    idx = index_check(cfg, args.dataset, n_queries=cfg.index.recall_queries, n_latency=20 if args.quick else 100)

    inter = data.load_interactions(cfg, args.dataset)
    items = data.load_items(cfg, args.dataset)
    rng = np.random.default_rng(0)
    users = rng.choice(inter[S.USER_ID].unique(), size=min(2000, inter[S.USER_ID].nunique()), replace=False).tolist()
    popular = inter[S.ITEM_ID].value_counts().index[:50].tolist()
    titles = items.set_index(S.ITEM_ID)[S.TITLE]
    seeds = [(int(i), str(titles.get(i, f"item {i}"))) for i in rng.choice(popular, size=3 if args.quick else 10,
                                                                           replace=False)]

    run = hygiene.begin(args, say=log)  # the measured part: start-up and requests (after training/indexing)
    port, token = free_port(), secrets.token_hex(16)
    from learn_tasks.online.service import worker_count

    workers = worker_count(cfg, args.workers)
    log(f"starting the service on 127.0.0.1:{port} (search={args.search}, {workers} worker(s))")
    t0 = time.perf_counter()
    proc = start_service(str(work), args.dataset, port, token, args.search, args.startup_timeout_s, workers)
    startup_s = time.perf_counter() - t0
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        health = httpx.get(f"{base}/health", timeout=10).json()
        log("warm-up")
        drive(base, users[:50], 1, 50, 30.0)
        log(f"concurrency 1: {n_req} requests / {duration:.0f} s max")
        c1 = drive(base, users, 1, n_req, duration)
        log(f"concurrency 8: {n_req} requests / {duration:.0f} s max")
        c8 = drive(base, users[::-1], 8, n_req, duration)
        unknown = drive(base, [10**15 + i for i in range(50)], 1, 50, 20.0)
        log("new items and events")
        new = new_item_times(base, token, seeds)
        ev = event_times(base, token, [(int(u), int(i)) for u, i in zip(users[:20], popular[:20])])
    finally:
        stop_service(proc)
        from learn_tasks.online import milvus_server

        if milvus_server.status(cfg)["running"]:  # a multi-worker service left the local server up
            milvus_server.stop(cfg)

    result = {
        "p50_ms": c1["p50_ms"], "p95_ms": c1["p95_ms"], "p99_ms": c1["p99_ms"], "rps_c1": c1["rps"],
        "p50_ms_c8": c8["p50_ms"], "p95_ms_c8": c8["p95_ms"], "p99_ms_c8": c8["p99_ms"], "rps_c8": c8["rps"],
        "errors": c1["errors"] + c8["errors"] + unknown["errors"] + ev["event_errors"] + new["new_item_misses"],
        "requests_c1": c1["requests"], "requests_c8": c8["requests"],
        "new_item_s": new["new_item_s"], "new_item_s_max": new["new_item_s_max"],
        "new_item_server_s": new["new_item_server_s"], "new_item_misses": new["new_item_misses"],
        "server_ms_c1": c1["server_ms"], **{k: v for k, v in idx.items()},
        "index_recall_at_10_at_load": prep.get("index_build", {}).get("index_recall_at_10"),
        "unknown_user_p50_ms": unknown["p50_ms"], "unknown_user_strategies": unknown["strategies"],
        **ev, "c1": c1, "c8": c8, "search": args.search, "service_startup_s": startup_s,
        "health": health.get("checks"), "dataset": args.dataset, "model_version": prep["model_version"],
        "learn_home": args.home, "work_dir": str(work),
        "prepare": prep, "quick": args.quick, "targets": TARGETS,
        "meets_targets": {"p99_ms": (c1["p99_ms"] or 1e9) <= TARGETS["p99_ms"],
                          "errors": c1["errors"] + c8["errors"] == 0,
                          "new_item_s": (new["new_item_s"] or 1e9) < TARGETS["new_item_s"]},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0], "python": platform.python_version(),
                    "platform": platform.platform()},
        "total_s": time.perf_counter() - t_start, "workers": workers,
        "notes": "service and driver share this machine's CPUs; the driver is a separate process (this one).",
    }
    result.update(run.finish())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from learn_tasks.storage import write_json

    write_json(result, RESULTS)
    log(f"wrote {RESULTS}")
    print(json.dumps({k: result[k] for k in ("p50_ms", "p99_ms", "p99_ms_c8", "rps_c8", "errors", "new_item_s",
                                             "index_recall_at_10", "index_search_ms_p50")}, indent=2))


if __name__ == "__main__":
    main()
