"""Benchmark: CEG throughput of ``learn_tasks.ceg.encoder`` against ``SentenceTransformer.encode``.

Both encode the same item texts (the Amazon Books sample's titles rendered with ``encode.template``,
exactly what ``learn encode`` encodes) with the same model (the packaged all-MiniLM-L6-v2), the same
token budget and the same torch thread count.

Timing (see ``bench/hygiene.py``): the benchmark first waits (bounded) for a quiet machine, then runs
the sides interleaved: in each of ``--rounds`` (at least 3) rounds every side encodes all the texts,
``--chunk`` texts per call, the order rotating every round (ours st fast, st fast ours, ...), so a
change in load hits every side alike. Each side's items/s is the median over the rounds; ``ratio`` is
ours / sentence-transformers. The result records the load average, the CPU time other processes used
during the run, ``noisy``, the git commit and the command line.
Memory: each side then runs alone in a child process on the first chunk, and its peak resident
memory (model included) is reported.

Checks: every item's embedding agrees with sentence-transformers (cosine >= 0.999 in fp32). The
opt-in fast mode (``--fast auto``: bf16 on a CPU with native bf16 arithmetic, else dynamic int8
attention projections) is reported in the same file with its cosine against fp32.
``--profile`` adds where each side's CPU time goes (tokenising, Linear layers, attention, ...).

Writes ``bench/results/encode.json`` (``items_per_s``, ``st_items_per_s``, ``ratio``, ``min_cosine``,
``fast.ratio_vs_st``, ``fast.min_cosine_vs_fp32``, ``noisy``, ``load_avg``, ``n_items``, ``threads``,
peak memory, per-round figures).

Usage: python bench/encode.py [--quick] [--n N] [--rounds R] [--chunk C] [--threads T]
       [--fast auto|bf16|int8|none] [--profile] [--dataset NAME]
       (--dataset: LEARN_HOME's prepared dataset NAME; default: the Amazon Books sample, prepared
       on first use with ``public.ensure_prepared``)
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import re
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py)

RESULTS = ROOT / "bench" / "results" / "encode.json"
MIN_COSINE = 0.999  # exact fp32 mode: ours vs sentence-transformers, per item
MIN_FAST_COSINE = 0.99  # fast mode vs exact fp32, per item
FAST_SETTINGS = {"int8": ["encode.quantize=int8"], "bf16": ["encode.dtype=bf16"]}


def resolve_fast(fast: str) -> str:
    """``auto`` -> bf16 where the CPU computes bf16 natively (AVX512-BF16/AMX), else int8."""
    if fast != "auto":
        return fast
    from learn_tasks.ceg import kernels

    return "bf16" if kernels.native_bf16() else "int8"


# -------------------------------------------------------------------------------------------- sides
def make_side(side: str, threads: int, fast: str, st_batch_size: int):
    """A function texts -> float32 [N, D] for one side: ours (exact fp32), st, or fast."""
    from learn_tasks.ceg import encoder as ceg_encoder
    from learn_tasks.config import load_settings

    overrides = [f"encode.threads={threads}"]
    if side == "fast":
        overrides += FAST_SETTINGS[fast]
    cfg = load_settings(overrides=overrides)
    if side == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(ceg_encoder.resolve_model_path(cfg.encode.model)), device="cpu")
        # the same token budget as ours, so truncation cannot make the two differ
        model.max_seq_length = min(cfg.encode.max_tokens, model.max_seq_length or 10**9)
        return lambda batch: np.asarray(model.encode(batch, batch_size=st_batch_size, convert_to_numpy=True,
                                                     normalize_embeddings=True, show_progress_bar=False))
    encoder = ceg_encoder.load_encoder(cfg)
    d = encoder.describe()
    ENCODERS[side] = {k: d.get(k) for k in ("fingerprint", "attention", "onednn_linear_layers", "dtype", "quantize")}
    return encoder.encode_texts


ENCODERS: dict[str, dict] = {}  # side -> what its encoder runs (kernels, fingerprint)


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


# -------------------------------------------------------------------------------------------- profile
# Where CPU time goes, by the name of the function that spends it (cProfile's own time per function).
PROFILE_GROUPS = [
    ("tokenise", r"encode_batch|tokeniz|_batch_encode|convert_tokens"),
    ("linear", r"linear|addmm|_linear_pointwise|quantized"),
    ("attention", r"scaled_dot_product|softmax|baddbmm|\bbmm\b|matmul"),
    ("activation", r"gelu|silu|tanh"),
    ("layer_norm", r"layer_norm|rms_norm"),
    ("embeddings", r"\bembedding\b"),
    ("pooling_and_copies", r"normalize|\bsum\b|\bmul\b|\bdiv\b|numpy|to_dense|copy|full|zeros|from_numpy"),
]


def profile_side(fn, texts: list[str]) -> dict:
    """cProfile (CPU time) of one call: seconds per group, the rest being Python and other overhead."""
    prof = cProfile.Profile(timer=time.process_time)
    prof.enable()
    fn(texts)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    groups = {g: 0.0 for g, _ in PROFILE_GROUPS} | {"python_and_other": 0.0}
    top = []
    for (file, _, name), (_, ncalls, tottime, _, _) in stats.items():
        label = name if file == "~" else f"{Path(file).name}:{name}"
        top.append((tottime, ncalls, label))
        for group, pattern in PROFILE_GROUPS:
            if re.search(pattern, name):
                groups[group] += tottime
                break
        else:
            groups["python_and_other"] += tottime
    top.sort(reverse=True)
    return {"cpu_s": round(total, 3), "texts": len(texts), "seconds": {g: round(v, 3) for g, v in groups.items()},
            "share": {g: round(v / total, 3) if total else 0.0 for g, v in groups.items()},
            "top": [{"function": lab, "calls": n, "cpu_s": round(t, 3)} for t, n, lab in top[:12]]}


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


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a seeded sample of --n (default 3000) titles")
    ap.add_argument("--n", type=int, default=None, help="number of titles (default: all; 3000 with --quick)")
    ap.add_argument("--rounds", type=int, default=hygiene.MIN_ROUNDS, help="interleaved rounds (at least 3)")
    ap.add_argument("--chunk", type=int, default=500, help="texts per encode call (each side sorts within a call)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--fast", default="auto", choices=["auto", "bf16", "int8", "none"],
                    help="opt-in fast mode to report (auto: bf16 on a CPU with native bf16, else int8)")
    ap.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size (its default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side memory runs")
    ap.add_argument("--profile", action="store_true", help="also profile each side (CPU time by kind of work)")
    ap.add_argument("--profile-n", type=int, default=1000, help="texts per profiled call")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--out-file", default=str(RESULTS))
    hygiene.add_arguments(ap)
    ap.add_argument("--worker", choices=["ours", "st", "fast"], help=argparse.SUPPRESS)  # memory child
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.fast = resolve_fast(args.fast)
        return memory_worker(args)
    if args.rounds < hygiene.MIN_ROUNDS:
        ap.error(f"--rounds must be at least {hygiene.MIN_ROUNDS}")

    import torch

    args.fast = resolve_fast(args.fast)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    n = args.n if args.n is not None else (3000 if args.quick else None)
    texts, dataset = load_texts(args.dataset, n)
    sides = ["ours", "st"] + (["fast"] if args.fast != "none" else [])
    chunks = [texts[i:i + args.chunk] for i in range(0, len(texts), args.chunk)]
    run = hygiene.begin(args)
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

    def whole(side: str):
        def encode_all() -> np.ndarray:
            return np.concatenate([fns[side](chunk) for chunk in chunks])
        return encode_all

    rounds = hygiene.interleave({side: whole(side) for side in sides}, rounds=args.rounds)
    rates = {side: hygiene.per_second(len(texts), rounds[side]["seconds"]) for side in sides}
    for side in sides:
        print(f"{side}: {rates[side]['median']} items/s (rounds {rates[side]['per_round']})", file=sys.stderr)
    profile = {side: profile_side(fns[side], texts[:args.profile_n]) for side in sides} if args.profile else None
    emb = {side: rounds[side]["result"] for side in sides}
    ips = {side: rates[side]["median"] for side in sides}
    paired = [o / s for o, s in zip(rounds["st"]["seconds"], rounds["ours"]["seconds"])]

    def mem(side: str, key: str) -> float | None:
        return round(memory[side][key], 1) if side in memory else None

    c = cosines(emb["ours"], emb["st"])
    from learn_tasks.config import load_settings

    cfg = load_settings()
    result = {
        "dataset": dataset, "text": "encode.template over each item's fields", "n_items": len(texts),
        "model": cfg.encode.model, "max_tokens": cfg.encode.max_tokens, "batch_tokens": cfg.encode.batch_tokens,
        "max_batch": cfg.encode.max_batch, "st_batch_size": args.st_batch_size, "chunk": args.chunk,
        "threads": args.threads, "quick": bool(args.quick), "rounds": args.rounds,
        "items_per_s": ips["ours"], "st_items_per_s": ips["st"],
        "ratio": round(ips["ours"] / ips["st"], 3),
        "ratio_per_round": [round(x, 3) for x in paired],
        "items_per_s_rounds": rates["ours"]["per_round"], "st_items_per_s_rounds": rates["st"]["per_round"],
        "seconds": round(rounds["ours"]["median_s"], 3), "st_seconds": round(rounds["st"]["median_s"], 3),
        "min_cosine": round(float(c.min()), 6), "mean_cosine": round(float(c.mean()), 6),
        "cosine_ok": bool(c.min() >= MIN_COSINE),
        "peak_rss_mb": mem("ours", "peak_rss_mb"), "st_peak_rss_mb": mem("st", "peak_rss_mb"),
        "rss_after_load_mb": mem("ours", "rss_after_load_mb"), "st_rss_after_load_mb": mem("st", "rss_after_load_mb"),
        "memory_texts": len(chunks[0]), "encoder": ENCODERS.get("ours"),
        "cpu_count": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if "fast" in emb:
        fc = cosines(emb["fast"], emb["ours"])
        result["fast"] = {
            "mode": args.fast, "items_per_s": ips["fast"], "ratio_vs_st": round(ips["fast"] / ips["st"], 3),
            "speedup_vs_fp32": round(ips["fast"] / ips["ours"], 3), "seconds": round(rounds["fast"]["median_s"], 3),
            "items_per_s_rounds": rates["fast"]["per_round"],
            "ratio_vs_st_per_round": [round(s / f, 3) for s, f in zip(rounds["st"]["seconds"], rounds["fast"]["seconds"])],
            "min_cosine_vs_fp32": round(float(fc.min()), 6), "mean_cosine_vs_fp32": round(float(fc.mean()), 6),
            "cosine_ok": bool(fc.min() >= MIN_FAST_COSINE), "peak_rss_mb": mem("fast", "peak_rss_mb"),
            "setting": " ".join(f"--set {s}" for s in FAST_SETTINGS[args.fast]), "encoder": ENCODERS.get("fast"),
        }
    if profile is not None:
        result["profile"] = profile
    result.update(run.finish())
    out = Path(args.out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    from learn_tasks.storage import write_json

    write_json(result, out)
    print(json.dumps(result, indent=2))
    if result["noisy"]:
        print(f"NOTE: noisy run ({'; '.join(result['hygiene']['why_noisy'])}): rerun on a quiet machine",
              file=sys.stderr)
    if not result["cosine_ok"]:
        raise SystemExit(f"embeddings disagree with sentence-transformers: min cosine {c.min():.6f} < {MIN_COSINE}")


if __name__ == "__main__":
    main()
