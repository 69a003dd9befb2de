"""Benchmark: CEG throughput of ``learn_tasks.ceg.encoder`` against ``SentenceTransformer.encode``.

Both encode the same item texts (the Amazon Books sample's titles rendered with ``encode.template``,
exactly what ``learn encode`` encodes) with the same model (the packaged all-MiniLM-L6-v2), the same
token budget and the same torch thread count.

Timing: both sides (and the opt-in fast mode) live in one process and take turns on consecutive
chunks of the texts (``--chunk`` texts each, the order rotating every chunk), so a machine whose load
changes over the run slows every side alike; each side's items/s is its total over all chunks.
Memory: each side then runs alone in a child process on the first chunk, and its peak resident
memory (model included) is reported.

Checks: every item's embedding agrees with sentence-transformers (cosine >= 0.999 in fp32). The
opt-in fast mode (dynamic int8 attention projections by default) is reported in the same file with
its cosine against fp32.

Writes ``bench/results/encode.json`` (``items_per_s``, ``st_items_per_s``, ``ratio``, ``min_cosine``,
``n_items``, ``threads``, peak memory, the fast mode's figures).

Usage: python bench/encode.py [--quick] [--n N] [--chunk C] [--threads T] [--fast int8|bf16|none]
       [--dataset NAME]   (LEARN_HOME's prepared dataset NAME; default: the Amazon Books sample, prepared
                            on first use with ``public.ensure_prepared``)
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


# -------------------------------------------------------------------------------------------- sides
def make_side(side: str, threads: int, fast: str, st_batch_size: int):
    """A function texts -> float32 [N, D] for one side: ours (exact fp32), st, or fast."""
    from learn_tasks.ceg import encoder as ceg_encoder
    from learn_tasks.config import load_settings

    overrides = [f"encode.threads={threads}"]
    if side == "fast":
        overrides += ["encode.quantize=int8"] if fast == "int8" else [f"encode.dtype={fast}"]
    cfg = load_settings(overrides=overrides)
    if side == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(ceg_encoder.resolve_model_path(cfg.encode.model)), device="cpu")
        # the same token budget as ours, so truncation cannot make the two differ
        model.max_seq_length = min(cfg.encode.max_tokens, model.max_seq_length or 10**9)
        return lambda batch: np.asarray(model.encode(batch, batch_size=st_batch_size, convert_to_numpy=True,
                                                     normalize_embeddings=True, show_progress_bar=False))
    encoder = ceg_encoder.load_encoder(cfg)
    return encoder.encode_texts


def memory_worker(args: argparse.Namespace) -> None:
    """Child process: one side alone on the given texts; prints its peak resident memory."""
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    fn = make_side(args.worker, args.threads, args.fast, args.st_batch_size)
    rss_loaded = peak_rss_mb()
    fn(texts)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would carry over
    the parent's peak into a forked child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(side: str, texts_path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--texts", str(texts_path), "--threads", str(args.threads),
           "--fast", args.fast, "--st-batch-size", str(args.st_batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{side} memory worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- texts
def load_texts(dataset: str | None, n: int | None, seed: int = 0) -> tuple[list[str], str]:
    from learn_tasks.data import datasets as data
    from learn_tasks.data import public
    from learn_tasks.ceg import text
    from learn_tasks.config import load_settings

    cfg = load_settings()
    name = dataset or "amazon-books-2014-sample"
    if dataset is None or not (cfg.paths.dataset(name) / "manifest.json").exists():
        public.ensure_prepared(cfg, name)
    items = data.load_items(cfg, name)
    prep = text.prepare_items(items, cfg.encode.template)
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
    ap.add_argument("--chunk", type=int, default=500, help="texts per turn (each side sorts within a turn)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--fast", default="int8", choices=["int8", "bf16", "none"], help="opt-in fast mode to report")
    ap.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size (its default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side memory runs")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--out-file", default=str(RESULTS))
    ap.add_argument("--worker", choices=["ours", "st", "fast"], help=argparse.SUPPRESS)  # memory child
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return memory_worker(args)

    import torch

    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    n = args.n if args.n is not None else (3000 if args.quick else None)
    texts, dataset = load_texts(args.dataset, n)
    sides = ["ours", "st"] + (["fast"] if args.fast != "none" else [])
    chunks = [texts[i:i + args.chunk] for i in range(0, len(texts), args.chunk)]
    memory: dict[str, dict] = {}
    if not args.no_memory:  # first, while this process holds no model
        with tempfile.TemporaryDirectory() as tmp:
            texts_path = Path(tmp) / "texts.json"
            texts_path.write_text(json.dumps(chunks[0]), encoding="utf-8")
            for side in sides:
                memory[side] = measure_memory(side, texts_path, args)
                print(f"memory {side}: peak {memory[side]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    fns = {side: make_side(side, args.threads, args.fast, args.st_batch_size) for side in sides}
    for fn in fns.values():
        fn(texts[:64])  # warm-up: first-call allocations and lazy initialisation
    seconds = {side: 0.0 for side in sides}
    parts: dict[str, list[np.ndarray]] = {side: [] for side in sides}
    for k, chunk in enumerate(chunks):
        turn = sides[k % len(sides):] + sides[:k % len(sides)]  # rotate who goes first
        for side in turn:
            t0 = time.perf_counter()
            parts[side].append(fns[side](chunk))
            seconds[side] += time.perf_counter() - t0
        done = sum(len(c) for c in chunks[:k + 1])
        print(f"chunk {k + 1}/{len(chunks)}: " + "  ".join(f"{s} {done / seconds[s]:.1f}/s" for s in sides),
              file=sys.stderr, flush=True)
    emb = {side: np.concatenate(parts[side]) for side in sides}

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return (a * b).sum(1)

    def mem(side: str, key: str) -> float | None:
        return round(memory[side][key], 1) if side in memory else None

    c = cos(emb["ours"], emb["st"])
    ips = {side: len(texts) / seconds[side] for side in sides}
    from learn_tasks.config import load_settings

    cfg = load_settings()
    result = {
        "dataset": dataset, "text": "encode.template over each item's fields", "n_items": len(texts),
        "model": cfg.encode.model, "max_tokens": cfg.encode.max_tokens, "batch_tokens": cfg.encode.batch_tokens,
        "max_batch": cfg.encode.max_batch, "st_batch_size": args.st_batch_size, "chunk": args.chunk,
        "threads": args.threads, "quick": bool(args.quick),
        "items_per_s": round(ips["ours"], 1), "st_items_per_s": round(ips["st"], 1),
        "ratio": round(ips["ours"] / ips["st"], 3),
        "seconds": round(seconds["ours"], 3), "st_seconds": round(seconds["st"], 3),
        "min_cosine": round(float(c.min()), 6), "mean_cosine": round(float(c.mean()), 6),
        "cosine_ok": bool(c.min() >= MIN_COSINE),
        "peak_rss_mb": mem("ours", "peak_rss_mb"), "st_peak_rss_mb": mem("st", "peak_rss_mb"),
        "rss_after_load_mb": mem("ours", "rss_after_load_mb"), "st_rss_after_load_mb": mem("st", "rss_after_load_mb"),
        "memory_texts": len(chunks[0]),
        "cpu_count": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if "fast" in emb:
        fc = cos(emb["fast"], emb["ours"])
        result["fast"] = {
            "mode": args.fast, "items_per_s": round(ips["fast"], 1), "ratio_vs_st": round(ips["fast"] / ips["st"], 3),
            "speedup_vs_fp32": round(ips["fast"] / ips["ours"], 3), "seconds": round(seconds["fast"], 3),
            "min_cosine_vs_fp32": round(float(fc.min()), 6), "mean_cosine_vs_fp32": round(float(fc.mean()), 6),
            "cosine_ok": bool(fc.min() >= MIN_FAST_COSINE), "peak_rss_mb": mem("fast", "peak_rss_mb"),
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
