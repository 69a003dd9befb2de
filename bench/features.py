"""Benchmark: the production feature stage with each offline store.

Two sides on the production stack (Redis online store, SQL registry in PostgreSQL):

* ``direct``: ``features.offline_store: file``, the Parquet tables, and the latest row of each entity
  written through Feast's online write API (no materialisation interval in the registry);
* ``feast``: ``features.offline_store: postgres``, the tables synced to PostgreSQL and
  ``FeatureStore.materialize`` (intervals in the registry).

Per dataset and side, in a LEARN_HOME of its own: a first run (``first_run_s``, not compared: it pays
for imports and the registry's tables), full runs (``materialize_features(force=True)``; its phases:
building the tables, the PostgreSQL sync, apply, materialise), then an increment (one new event
for each of ``--increment-users`` users, an hour after the last event, ``incremental=True``), then, on the
``feast`` side, ``feast materialize-incremental <now>`` in the rendered repo directory. The full runs go in
turns (direct, feast, feast, direct) and each side reports its median.

Datasets: ``synth`` (the tests' generated data, 200 users and 300 items), ``amazon-books-2014-sample`` (the
shared sample, prepared here from ``data.mirror``) and ``synth50k`` (50,000 generated users). Each side uses
a fresh PostgreSQL database on 127.0.0.1:5432 (dropped afterwards) and Redis on 127.0.0.1:6379 under a Feast
project of its own (torn down afterwards).

Writes bench/results/features.json. Usage: python bench/features.py [--datasets synth,amazon-books-2014-sample]
[--home DIR] [--increment-users N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)
from hygiene import log  # noqa: E402
from learn_tasks import schema as S  # noqa: E402
from learn_tasks.config import load_settings  # noqa: E402
from learn_tasks.data import datasets as data  # noqa: E402
from learn_tasks.data import public, synth  # noqa: E402
from learn_tasks.online import features  # noqa: E402
from learn_tasks.storage import write_parquet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "features.json"
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "127.0.0.1:6379"
SIDES = {"direct": "file", "feast": "postgres"}


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def prepare(home: Path, dataset: str) -> str:
    """The dataset prepared under ``home`` as ``bench``; returns the name."""
    os.environ["LEARN_HOME"] = str(home)
    cfg = load_settings()
    if dataset == "synth":
        src = synth.write_seqrec(home / "src", synth.SynthSpec(n_users=200, n_items=300))
        data.prepare_dataset(cfg, "seqrec", src, "bench")
    elif dataset == "synth50k":
        src = synth.write_seqrec(home / "src", synth.SynthSpec(n_users=50_000, n_items=20_000))
        data.prepare_dataset(cfg, "seqrec", src, "bench")
    else:
        got = public.fetch_dataset(cfg, dataset)
        data.prepare_dataset(cfg, got["format"], got["path"], "bench")
    return "bench"


def side_settings(home: Path, offline: str, db: str):
    os.environ["LEARN_HOME"] = str(home)
    os.environ["LEARN_FEATURES__REGISTRY_URL"] = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
    return load_settings(overrides=["features.online_store=redis", "features.registry=sql",
                                    f"features.offline_store={offline}"])


def add_increment(cfg, name: str, n_users: int) -> int:
    """One new event for each of ``n_users`` users, an hour after the last event; returns the users touched."""
    inter = data.load_interactions(cfg, name)
    users = inter[S.USER_ID].drop_duplicates().sample(n=min(n_users, inter[S.USER_ID].nunique()), random_state=0)
    when = inter[S.EVENT_TIMESTAMP].max() + pd.Timedelta(hours=1)
    added = pd.DataFrame({S.USER_ID: users.to_numpy(), S.ITEM_ID: inter[S.ITEM_ID].sample(
        n=len(users), replace=True, random_state=1).to_numpy(), S.EVENT_TIMESTAMP: when})
    for col in inter.columns.difference(added.columns):
        added[col] = inter[col].iloc[0]
    write_parquet(pd.concat([inter, added[inter.columns]], ignore_index=True),
                  cfg.paths.dataset(name) / "interactions.parquet")
    return len(users)


def feast_cli(cfg, name: str) -> dict:
    root = features.store_dir(cfg, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARN_")}
    env.update(LEARN_FEATURES__REGISTRY_URL=cfg.features.registry_url, LEARN_FEATURES__REDIS_URL=REDIS)
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("feast")), "materialize-incremental", now], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1800)
    return {"rc": done.returncode, "seconds": round(time.perf_counter() - t0, 2),
            **({"stderr_tail": done.stderr[-500:]} if done.returncode else {})}


def bench_dataset(base: Path, dataset: str, increment_users: int) -> dict:
    home0 = base / dataset
    shutil.rmtree(home0, ignore_errors=True)
    t0 = time.perf_counter()
    name = prepare(home0, dataset)
    prepared_s = time.perf_counter() - t0
    inter = data.load_interactions(load_settings(), name)
    out: dict = {"interactions": len(inter), "users": int(inter[S.USER_ID].nunique()),
                 "items": len(data.load_items(load_settings(), name)), "prepare_s": round(prepared_s, 1), "sides": {}}
    homes, dbs = {}, {}
    for side in SIDES:  # each side its own copy of the prepared home and its own database
        homes[side] = base / f"{dataset}-{side}"
        shutil.rmtree(homes[side], ignore_errors=True)
        shutil.copytree(home0, homes[side])
        dbs[side] = f"learn_features_bench_{uuid.uuid4().hex[:8]}"
        admin(f'CREATE DATABASE "{dbs[side]}"')
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    try:
        for side in SIDES:  # warm-up, not measured: imports, the registry's tables, the first apply
            out["sides"][side] = {"first_run_s": features.materialize_features(
                side_settings(homes[side], SIDES[side], dbs[side]), name)["seconds"]}
        for side in ("direct", "feast", "feast", "direct"):
            cfg = side_settings(homes[side], SIDES[side], dbs[side])
            t0 = time.perf_counter()
            res = features.materialize_features(cfg, name, force=True)
            res["seconds"]["total"] = round(time.perf_counter() - t0, 3)
            runs[side].append(res)
            log(f"{dataset} {side}: full run {res['seconds']}")
        for side in SIDES:
            cfg = side_settings(homes[side], SIDES[side], dbs[side])
            first = runs[side][0]
            touched = add_increment(cfg, name, increment_users)
            t0 = time.perf_counter()
            inc = features.materialize_features(cfg, name, incremental=True)
            inc["seconds"]["total"] = round(time.perf_counter() - t0, 3)
            log(f"{dataset} {side}: increment {inc['seconds']} {inc['written']}")
            out["sides"][side] |= {
                "rows": first["rows"], "written_full": first["written"]["rows"],
                "full_s": {k: round(statistics.median(r["seconds"][k] for r in runs[side]), 3)
                           for k in first["seconds"]},
                "full_s_all": [r["seconds"]["total"] for r in runs[side]],
                "increment_users": touched, "increment_s": inc["seconds"], "written_increment": inc["written"],
            }
            if side == "feast":
                out["sides"][side]["feast_cli_materialize_incremental"] = feast_cli(cfg, name)
                log(f"{dataset} feast CLI: {out['sides'][side]['feast_cli_materialize_incremental']}")
            features.teardown(cfg, name)
    finally:
        for side in SIDES:
            admin(f'DROP DATABASE IF EXISTS "{dbs[side]}" WITH (FORCE)')
    d, f = out["sides"]["direct"]["full_s"], out["sides"]["feast"]["full_s"]
    out["feast_over_direct_materialize"] = round(f["materialize"] / max(d["materialize"], 1e-3), 2)
    out["feast_over_direct_total"] = round(f["total"] / max(d["total"], 1e-3), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", default="synth,amazon-books-2014-sample",
                    help="comma-separated: synth, amazon-books-2014-sample, synth50k")
    ap.add_argument("--home", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--increment-users", type=int, default=100)
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    base = args.home or Path(tempfile.mkdtemp(prefix="learn-features-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    run = hygiene.begin(args)
    result = {"datasets": {}, "recent_items": int(load_settings().model.max_len), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "numpy": np.__version__}
    try:
        for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            result["datasets"][dataset] = bench_dataset(base, dataset, args.increment_users)
    finally:
        if args.home is None:
            shutil.rmtree(base, ignore_errors=True)
    result.update(run.finish())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
