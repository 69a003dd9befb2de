"""Benchmark: wall time and peak memory of a full `learn_pipeline` run and of an incremental one.

The Amazon Books sample is split the way new data really arrives: 1% of the items (chosen at random) and
the last ordinary day of events (the crawl's final days are nearly empty) are held out. The full run trains on the rest; the incremental run then lands
the held-out items and the day of events (through ``$LEARN_HOME/incoming/``) and runs the pipeline in
incremental mode (validate the new batch only, encode only new items, a sparse update of the promoted
model, rewrite only the changed rows in Milvus). Each run executes in its own process through Airflow's runner, exactly as
``learn run`` does, so its peak RSS is its own.

    python bench/pipeline.py            # the whole sample, the configured training budgets
    python bench/pipeline.py --quick    # 20% of the users (and the items they touched), short budgets

Writes ``bench/results/pipeline.json`` (``--quick``: ``pipeline.json`` as well, flagged ``"quick": true``) and
a copy per size, ``pipeline_whole.json`` or ``pipeline_quick.json``,
with at least ``full_s``, ``incremental_s``, ``ratio`` (incremental / full), ``peak_rss_mb``, per-task seconds
(``tasks.full``, ``tasks.incremental``), ``load_avg`` and ``noisy`` (load average over 1.3 before or after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)

SOURCE = "amazon-books-2014-sample"
DATASET = "amazon-books-bench"


def _settings(home: Path):
    os.environ["LEARN_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from learn_tasks.config import load_settings

    return load_settings()


def carve(home: Path, quick: bool, seed: int = 0) -> dict:
    """Prepare the base dataset (history minus the increment) and write the increment to a side folder."""
    import numpy as np
    import pandas as pd

    from learn_tasks.data import datasets as data
    from learn_tasks.data import public
    from learn_tasks import schema as S

    cfg = _settings(home)
    public.ensure_prepared(cfg, SOURCE)
    inter, items = data.load_interactions(cfg, SOURCE), data.load_items(cfg, SOURCE)
    rng = np.random.default_rng(seed)
    if quick:  # a fifth of the users and the items they touched: same shape, a fraction of the cost
        users = inter[S.USER_ID].unique()
        keep = rng.choice(users, size=len(users) // 5, replace=False)
        inter = inter[inter[S.USER_ID].isin(keep)]
        items = items[items[S.ITEM_ID].isin(inter[S.ITEM_ID])]
    # The crawl thins out in its last days (a handful of events a day): the increment is the last
    # *ordinary* day, one with at least half the median daily volume of the final 90 days. Events after
    # it are left out of both parts (they would be the future of the benchmark).
    days = inter[S.EVENT_TIMESTAMP].dt.floor("D")
    per_day = days.value_counts().sort_index()
    recent = per_day[per_day.index > per_day.index.max() - pd.Timedelta(days=90)]
    last_day = recent[recent >= 0.5 * recent.median()].index.max()
    held = rng.choice(items[S.ITEM_ID].to_numpy(), size=max(1, round(0.01 * len(items))), replace=False)
    base_inter = inter[(days < last_day) & ~inter[S.ITEM_ID].isin(held)]
    base_items = items[~items[S.ITEM_ID].isin(held)]
    new_inter = inter[days == last_day]
    new_items = items[items[S.ITEM_ID].isin(held)]
    dropped_after = int((days > last_day).sum())
    src = home / "bench_src"
    src.mkdir(parents=True, exist_ok=True)
    base_inter.to_parquet(src / "interactions.parquet", index=False)
    base_items.to_parquet(src / "items.parquet", index=False)
    data.prepare_dataset(cfg, "canonical", src, DATASET)
    inc = home / "bench_increment"
    inc.mkdir(exist_ok=True)
    new_inter.to_parquet(inc / "interactions-day.parquet", index=False)
    new_items.to_parquet(inc / "items-new.parquet", index=False)
    return {"base_events": len(base_inter), "base_items": len(base_items), "base_users": int(base_inter[S.USER_ID].nunique()),
            "new_events": len(new_inter), "new_items": len(new_items),
            "new_events_on_new_items": int(new_inter[S.ITEM_ID].isin(held).sum()),
            "events_after_day_left_out": dropped_after,
            "last_day": str(last_day.date()), "full_day": str((last_day - pd.Timedelta(days=1)).date())}


def phase(home: Path, mode: str, day: str, quick: bool, out: Path) -> None:
    """One pipeline run in this process (called in a child process by :func:`main`)."""
    cfg = _settings(home)
    if quick:
        # The incremental report samples as many test users as the full run's (3000, not the default 5000).
        cfg = cfg.with_overrides(pipeline={"budget_s": 45.0, "incremental_budget_s": 10.0, "eval_users": 3000,
                                           "incremental_eval_users": 3000, "gate_users": 2000})
        for key, value in {"BUDGET_S": "45", "INCREMENTAL_BUDGET_S": "10", "EVAL_USERS": "3000",
                           "INCREMENTAL_EVAL_USERS": "3000", "GATE_USERS": "2000"}.items():
            os.environ[f"LEARN_PIPELINE__{key}"] = value  # the in-process tasks load settings themselves
    from learn_tasks.orchestration import runner

    if mode == "incremental":  # the new batch arrives
        incoming = cfg.paths.incoming(DATASET)
        incoming.mkdir(parents=True, exist_ok=True)
        for f in (home / "bench_increment").glob("*.parquet"):
            (incoming / f.name).write_bytes(f.read_bytes())
    t0 = time.perf_counter()
    res = runner.run_pipeline(cfg, dataset=DATASET, mode=mode, day=day)
    wall = time.perf_counter() - t0
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    out.write_text(json.dumps({
        "ok": res["ok"], "wall_s": round(wall, 1), "peak_rss_mb": round(rss / 1024, 1),
        "tasks": {t["task"]: round(t["seconds"] or 0.0, 1) for t in res["tasks"]},
        "validation": {k: (res["validation"] or {}).get(k, {}).get("read") for k in ("interactions", "items")},
        "encoded": (res.get("encoding") or {}).get("encoded"),
        "training": {k: (res.get("training") or {}).get(k) for k in ("epochs_run", "stopped", "train_seconds",
                                                                      "warm_start", "val")},
        "promotion": {k: (res.get("promotion") or {}).get(k) for k in ("promoted", "reason")},
        "test_all": ((res.get("evaluation") or {}).get("test") or {}).get("table", {}).get("all"),
        "milvus_rows": (res.get("milvus") or {}).get("rows"),
        "failures": res.get("failures"),
    }, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20%% of the users, short training budgets")
    ap.add_argument("--home", type=Path, help="LEARN_HOME to use (default: a fresh temporary folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    ap.add_argument("--phase", choices=["full", "incremental"], help=argparse.SUPPRESS)
    ap.add_argument("--day", help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    if args.phase:
        phase(args.home, args.phase, args.day, args.quick, args.phase_out)
        return

    home = args.home or Path(tempfile.mkdtemp(prefix="learn-bench-pipeline-"))
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = carve(home, args.quick)
    print(f"base: {info['base_events']} events, {info['base_items']} items; increment: {info['new_events']} events "
          f"on {info['last_day']}, {info['new_items']} new items  (LEARN_HOME {home})", flush=True)
    run = hygiene.begin(args)  # the measured part: both pipeline runs
    runs = {}
    for mode, day in (("full", info["full_day"]), ("incremental", info["last_day"])):
        out = home / f"bench_{mode}.json"
        cmd = [sys.executable, __file__, "--phase", mode, "--day", day, "--home", str(home), "--phase-out", str(out)]
        if args.quick:
            cmd.append("--quick")
        print(f"{mode} run ...", flush=True)
        before = hygiene.Snapshot.take()
        subprocess.run(cmd, check=True, env={**os.environ, "LEARN_PROGRESS": "1"})
        runs[mode] = json.loads(out.read_text())
        runs[mode]["others"] = hygiene.other_cpu(before, hygiene.Snapshot.take())  # other processes' CPU meanwhile
        print(f"{mode}: {runs[mode]['wall_s']} s, peak RSS {runs[mode]['peak_rss_mb']} MB, ok={runs[mode]['ok']}",
              flush=True)
    full, inc = runs["full"]["wall_s"], runs["incremental"]["wall_s"]
    result = {
        "dataset": SOURCE, "quick": args.quick, **info,
        "full_s": full, "incremental_s": inc, "ratio": round(inc / full, 3),
        "peak_rss_mb": max(runs["full"]["peak_rss_mb"], runs["incremental"]["peak_rss_mb"]),
        "full_peak_rss_mb": runs["full"]["peak_rss_mb"], "incremental_peak_rss_mb": runs["incremental"]["peak_rss_mb"],
        "all_ok": runs["full"]["ok"] and runs["incremental"]["ok"],
        "tasks": {mode: runs[mode]["tasks"] for mode in runs},
        "full": runs["full"], "incremental": runs["incremental"],
        "total_s": round(time.perf_counter() - t0, 1), "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "learn_home": str(home),
    }
    result.update(run.finish())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str) + "\n"
    args.out.write_text(text)
    # one file per size as well, so the quick and the whole-sample figures are both kept
    args.out.with_name(f"{args.out.stem}_{'quick' if args.quick else 'whole'}.json").write_text(text)
    print(f"full {full} s, incremental {inc} s, ratio {result['ratio']}, peak RSS {result['peak_rss_mb']} MB "
          f"-> {args.out}")
    if not result["all_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
