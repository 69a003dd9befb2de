"""Benchmark: CEG throughput of ``learn_tasks.encode`` against ``SentenceTransformer.encode``.

Both encode the same item texts (the Amazon Books sample's titles rendered with ``encode.template``,
exactly what ``learn encode`` encodes) with the same model (the packaged all-MiniLM-L6-v2), the same
token budget and the same torch thread count. Each side runs in its own child process, so its peak
resident memory is its own; rounds alternate between the sides and the best round of each counts,
which keeps a busy machine from favouring whichever side ran during a quiet moment.

Checks: every item's embedding agrees with sentence-transformers (cosine >= 0.999 in fp32). The
opt-in fast mode (dynamic int8 by default) is reported in the same file with its cosine against fp32.

Writes ``bench/results/encode.json`` (``items_per_s``, ``st_items_per_s``, ``ratio``, ``min_cosine``,
``n_items``, ``threads``, peak memory, the fast mode's figures).

Usage: python bench/encode.py [--quick] [--n N] [--rounds R] [--threads T] [--fast int8|bf16|none]
       [--dataset NAME]   (LEARN_HOME's prepared dataset NAME; default: the Amazon Books sample, prepared
                            on first use with ``data.ensure_prepared``)
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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "encode.json"
MIN_COSINE = 0.999  # exact fp32 mode: ours vs sentence-transformers, per item
MIN_FAST_COSINE = 0.99  # fast mode vs exact fp32, per item


# -------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """Child process: load one encoder, warm it up, time ``rounds`` encodes of the texts, save embeddings."""
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    from learn_tasks import encode
    from learn_tasks.config import load_settings

    overrides = [f"encode.threads={args.threads}"]
    if args.side == "fast":
        overrides += ["encode.quantize=int8"] if args.fast == "int8" else [f"encode.dtype={args.fast}"]
    cfg = load_settings(overrides=overrides)
    t0 = time.perf_counter()
    if args.side == "st":
        from sentence_transformers import SentenceTransformer

        path = encode.resolve_model_path(cfg.encode.model)
        model = SentenceTransformer(str(path), device="cpu")
        # the same token budget as ours, so truncation cannot make the two differ
        model.max_seq_length = min(cfg.encode.max_tokens, model.max_seq_length or 10**9)

        def fn(batch: list[str]) -> np.ndarray:
            return model.encode(batch, batch_size=args.st_batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
    else:
        encoder = encode.load_encoder(cfg)

        def fn(batch: list[str]) -> np.ndarray:
            return encoder.encode_texts(batch)
    load_s = time.perf_counter() - t0
    fn(texts[:64])  # warm-up: first-call allocations and lazy initialisation
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    emb = fn(texts)
    seconds = time.perf_counter() - t0
    np.save(args.out, np.asarray(emb, dtype=np.float32))
    print(json.dumps({"seconds": seconds, "load_s": load_s, "threads": torch.get_num_threads(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_load_mb": rss_before}))


def run_worker(side: str, texts_path: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--texts", str(texts_path), "--out", str(out),
           "--threads", str(args.threads), "--fast", args.fast, "--st-batch-size", str(args.st_batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- texts
def load_texts(dataset: str | None, n: int | None, seed: int = 0) -> tuple[list[str], str]:
    from learn_tasks import data, encode
    from learn_tasks.config import load_settings

    cfg = load_settings()
    name = dataset or "amazon-books-2014-sample"
    if dataset is None or not (cfg.paths.dataset(name) / "manifest.json").exists():
        data.ensure_prepared(cfg, name)
    items = data.load_items(cfg, name)
    prep = encode.prepare_items(items, cfg.encode.template)
    texts = [t for t in prep.texts if t is not None]
    if n is not None and n < len(texts):  # a seeded sample keeps the full set's length mix
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), size=n, replace=False))]
    return texts, name


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a seeded sample of --n (default 3000) titles")
    ap.add_argument("--n", type=int, default=None, help="number of titles (default: all; 3000 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 3 quick, 1 full)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--fast", default="int8", choices=["int8", "bf16", "none"], help="opt-in fast mode to report")
    ap.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size (its default)")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--out-file", default=str(RESULTS))
    # child-process mode
    ap.add_argument("--worker", choices=["ours", "st", "fast"], help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.side = args.worker
        return worker(args)

    import torch

    args.threads = args.threads or torch.get_num_threads()
    n = args.n if args.n is not None else (3000 if args.quick else None)
    rounds = args.rounds or (3 if args.quick else 1)
    texts, dataset = load_texts(args.dataset, n)
    sides = ["ours", "st"] + (["fast"] if args.fast != "none" else [])
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_path = Path(tmp) / "texts.json"
        texts_path.write_text(json.dumps(texts), encoding="utf-8")
        emb: dict[str, np.ndarray] = {}
        seconds_all: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order as well
                out = Path(tmp) / f"{side}.npy"
                res = run_worker(side, texts_path, out, args)
                seconds_all[side].append(round(res["seconds"], 3))
                print(f"round {r + 1}/{rounds} {side:>4}: {len(texts) / res['seconds']:8.1f} items/s "
                      f"(peak {res['peak_rss_mb']:.0f} MB)", file=sys.stderr)
                if side not in best or res["seconds"] < best[side]["seconds"]:
                    best[side] = res
                best[side]["peak_rss_mb"] = max(best[side]["peak_rss_mb"], res["peak_rss_mb"])
                emb[side] = np.load(out)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return (a * b).sum(1)

    c = cos(emb["ours"], emb["st"])
    ours_ips = len(texts) / best["ours"]["seconds"]
    st_ips = len(texts) / best["st"]["seconds"]
    from learn_tasks.config import load_settings

    cfg = load_settings()
    result = {
        "dataset": dataset, "text": "encode.template over each item's fields", "n_items": len(texts),
        "model": cfg.encode.model, "max_tokens": cfg.encode.max_tokens, "batch_tokens": cfg.encode.batch_tokens,
        "max_batch": cfg.encode.max_batch, "st_batch_size": args.st_batch_size,
        "threads": args.threads, "rounds": rounds, "quick": bool(args.quick),
        "items_per_s": round(ours_ips, 1), "st_items_per_s": round(st_ips, 1), "ratio": round(ours_ips / st_ips, 3),
        "seconds": round(best["ours"]["seconds"], 3), "st_seconds": round(best["st"]["seconds"], 3),
        "seconds_all": seconds_all["ours"], "st_seconds_all": seconds_all["st"],
        "min_cosine": round(float(c.min()), 6), "mean_cosine": round(float(c.mean()), 6),
        "cosine_ok": bool(c.min() >= MIN_COSINE),
        "peak_rss_mb": round(best["ours"]["peak_rss_mb"], 1), "st_peak_rss_mb": round(best["st"]["peak_rss_mb"], 1),
        "rss_after_load_mb": round(best["ours"]["rss_after_load_mb"], 1),
        "st_rss_after_load_mb": round(best["st"]["rss_after_load_mb"], 1),
        "cpu_count": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if "fast" in best:
        fc = cos(emb["fast"], emb["ours"])
        fast_ips = len(texts) / best["fast"]["seconds"]
        result["fast"] = {
            "mode": args.fast, "items_per_s": round(fast_ips, 1), "ratio_vs_st": round(fast_ips / st_ips, 3),
            "speedup_vs_fp32": round(fast_ips / ours_ips, 3), "seconds_all": seconds_all["fast"],
            "min_cosine_vs_fp32": round(float(fc.min()), 6), "mean_cosine_vs_fp32": round(float(fc.mean()), 6),
            "cosine_ok": bool(fc.min() >= MIN_FAST_COSINE), "peak_rss_mb": round(best["fast"]["peak_rss_mb"], 1),
            "setting": "--set encode.quantize=int8" if args.fast == "int8" else f"--set encode.dtype={args.fast}",
        }
    out = Path(args.out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    from learn_tasks.storage import write_json

    write_json(result, out)
    print(json.dumps(result, indent=2))
    if not result["cosine_ok"]:
        raise SystemExit(f"embeddings disagree with sentence-transformers: min cosine {c.min():.6f} < {MIN_COSINE}")


if __name__ == "__main__":
    main()
