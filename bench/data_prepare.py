"""Benchmark: prepare the Amazon Books sample (SeqRec CSV pair -> canonical Parquet).

Writes bench/results/data_prepare.json with wall time, rows/s and peak resident memory.
Usage: python bench/data_prepare.py [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)
from learn_tasks.data import datasets as data
from learn_tasks.data import public
from learn_tasks.config import load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "data_prepare.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dataset", default="amazon-books-2014-sample")
    hygiene.add_arguments(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["LEARN_HOME"] = home
        cfg = load_settings()
        src = public.fetch_dataset(cfg, args.dataset)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        run = hygiene.begin(args)
        times, manifest = [], {}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            manifest = data.prepare_dataset(cfg, src["format"], src["path"], "bench")
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = min(times)
    result = {
        "dataset": args.dataset,
        "rows_read": manifest["rows_read"],
        "interactions": manifest["interactions"],
        "users": manifest["users"],
        "items": manifest["items"],
        "quarantined": manifest["quarantined"],
        "seconds": round(best, 3),
        "seconds_all": [round(t, 3) for t in times],
        "seconds_median": round(statistics.median(times), 3),
        "rows_per_s": round(manifest["rows_read"] / best),
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **run.finish(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
