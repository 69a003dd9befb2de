"""Recommendation quality on the Amazon Books sample: LEARN, the hybrid, SASRec and baselines, both protocols.

Every model is trained for the same number of epochs (``--epochs``; ``--budget-s`` caps the seconds, and
early stopping on validation Recall@200 may end it sooner) and evaluated by full ranking over the whole catalogue with the same harness
(``learn_tasks.evaluate``). Each training run is a separate process, so its peak memory is its own.

    python bench/quality.py --quick      # 1 epoch per model, 4,000 test users per protocol
    python bench/quality.py              # 5 epochs per model, every test user, and the LEARN ablation

Writes ``bench/results/quality_amazon_books.json``:
``{"loo"|"temporal": {model: {slice: {"recall@10", ..., "ndcg@200"}}}, "train": {model: {...}}, "configs": ...}``.
The dataset must be prepared and encoded under LEARN_HOME (``learn data prepare ...``, ``learn encode ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learn_tasks import schema as S  # noqa: E402
from learn_tasks.config import load_settings  # noqa: E402

RESULT = REPO / "bench" / "results" / "quality_amazon_books.json"
NEURAL = ("learn", "learn_hybrid", "sasrec")
BASELINES = ("popular", "content_knn")
KEEP = ("recall@10", "recall@50", "recall@200", "ndcg@10", "ndcg@50", "ndcg@200")
# LEARN ablation (protocol loo): each variant changes one thing of the `learn` model.
ABLATION = {
    "learn_next_item_loss": ["train.per_model.learn.train.loss=next_item"],
    "learn_item_tower_b": ["train.per_model.learn.model.item_tower=b"],
    "learn_item_tower_c": ["train.per_model.learn.model.item_tower=c"],
}


def train_subprocess(home: str, dataset: str, protocol: str, model: str, budget: float, epochs: int,
                     sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "learn_tasks.cli"]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["train", "--dataset", dataset, "--protocol", protocol, "--model", model, "--budget-s", str(budget),
            "--epochs", str(epochs), "--json"]
    env = {**os.environ, "LEARN_HOME": home, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"training {model} ({protocol}) failed")
    epochs_log = [line for line in proc.stderr.splitlines() if " epoch " in line]
    for line in epochs_log:
        print("   ", line.split("learn.train ")[-1], flush=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


# One-at-a-time sweep on validation (never test): each entry changes one setting of the kind's defaults.
SWEEP: dict[str, list] = {
    "train.temperature": [0.02, 0.1],
    "train.n_random_negatives": [128, 2048],
    "train.logq": [True],
    "model.dropout": [0.2],
    "train.lr": [3e-3],
}


def sweep(home: str, dataset: str, kinds: list[str], budget: float, epochs: int, sets: list[str]) -> dict:
    """Train each variant under loo and keep, per setting, the value with the best validation Recall@200."""
    out: dict = {}
    for kind in kinds:
        runs = []
        tr = train_subprocess(home, dataset, "loo", kind, budget, epochs, sets)
        base = (tr["val"] or {}).get("recall@200", -1.0)
        runs.append({"change": None, "val_recall@200": base, "epochs_run": tr["epochs_run"]})
        chosen: dict = {}
        for key, values in SWEEP.items():
            best_v, best = None, base
            for v in values:
                section, field = key.split(".")
                extra = [f"train.per_model.{kind}.{section}.{field}={json.dumps(v)}"]
                tr = train_subprocess(home, dataset, "loo", kind, budget, epochs, sets + extra)
                val = (tr["val"] or {}).get("recall@200", -1.0)
                runs.append({"change": {key: v}, "val_recall@200": val, "epochs_run": tr["epochs_run"]})
                print(f"   sweep {kind} {key}={v}: val recall@200 {val:.4f} (base {base:.4f})", flush=True)
                if val > best:
                    best_v, best = v, val
            if best_v is not None:
                chosen[key] = best_v
        out[kind] = {"runs": runs, "chosen": chosen, "budget_s": budget}
    return out


def chosen_sets(sweep_result: dict) -> list[str]:
    sets = []
    for kind, res in sweep_result.items():
        for key, v in res["chosen"].items():
            section, field = key.split(".")
            sets.append(f"train.per_model.{kind}.{section}.{field}={json.dumps(v)}")
    return sets


def slim(metrics: dict) -> dict:
    return {s: {k: metrics[s][k] for k in KEEP} for s in S.SLICES if s in metrics}


def table(result: dict, protocols: list[str], models: list[str]) -> str:
    lines = []
    for protocol in protocols:
        lines += [f"\n{protocol}: Recall@10/50/200 and NDCG@10 (%)", "| model | slice | R@10 | R@50 | R@200 | N@10 | N@200 |",
                  "|---|---|---|---|---|---|---|"]
        for model in models:
            for s, m in result[protocol].get(model, {}).items():
                lines.append(f"| {model} | {s} | " + " | ".join(f"{100 * m[k]:.2f}" for k in
                                                                   ("recall@10", "recall@50", "recall@200", "ndcg@10", "ndcg@200")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subset of test users, short training budget")
    ap.add_argument("--dataset", default="amazon-books-2014-sample")
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"), help="LEARN_HOME with the dataset")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per model (quick 1, full 5)")
    ap.add_argument("--budget-s", type=float, default=None, help="cap on training seconds per model")
    ap.add_argument("--max-users", type=int, default=None, help="test users per protocol (0 = all)")
    ap.add_argument("--models", default=",".join(NEURAL + BASELINES))
    ap.add_argument("--protocols", default="loo,temporal")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the LEARN ablation under loo (default: on in full mode)")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    ap.add_argument("--sweep", default="", help="comma-separated kinds to sweep on validation first (e.g. learn_hybrid,sasrec)")
    ap.add_argument("--sweep-budget-s", type=float, default=None, help="training seconds per sweep run")
    ap.add_argument("--output", type=Path, default=RESULT)
    args = ap.parse_args(argv)

    # Equal epochs for every model (the wall-clock budget is only a cap): on a shared machine whose load
    # changes from minute to minute, equal seconds would not be an equal budget.
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    budget = args.budget_s if args.budget_s is not None else (150.0 if args.quick else 900.0)
    max_users = args.max_users if args.max_users is not None else (4000 if args.quick else 0)
    ablation = args.ablation if args.ablation is not None else not args.quick
    if args.quick:  # a short budget leaves no room for long validations
        args.set = ["train.val_users=1000"] + args.set
    os.environ["LEARN_HOME"] = args.home
    cfg = load_settings(overrides=args.set + [f"evaluate.max_users={max_users}"])
    from learn_tasks import data, encode, evaluate, train

    if args.dataset in data.DATASETS:  # a registered public dataset: fetch and prepare it when missing
        data.ensure_prepared(cfg, args.dataset)
    if encode.current_fingerprint(cfg, args.dataset) is None:
        print(f"== encoding {args.dataset} (once)", flush=True)
        encode.run(cfg, args.dataset)

    models = args.models.split(",")
    protocols = args.protocols.split(",")
    result: dict = {p: {} for p in protocols}
    details: dict = {p: {} for p in protocols}
    result["train"], result["configs"] = {}, {}
    t_start = time.perf_counter()
    if args.sweep:
        sb = args.sweep_budget_s if args.sweep_budget_s is not None else budget / 2
        result["sweep"] = sweep(args.home, args.dataset, args.sweep.split(","), sb, epochs, args.set)
        args.set = args.set + chosen_sets(result["sweep"])
        cfg = load_settings(overrides=args.set + [f"evaluate.max_users={max_users}"])
    for protocol in protocols:
        for model in models:
            t0 = time.perf_counter()
            print(f"== {protocol} / {model}", flush=True)
            run_dir = None
            if model in NEURAL:
                tr = train_subprocess(args.home, args.dataset, protocol, model, budget, epochs, args.set)
                run_dir = tr["run_dir"]
                result["train"].setdefault(model, {})[protocol] = {
                    k: tr[k] for k in ("sequences_per_s", "peak_rss_mb", "train_seconds", "epochs_run", "best_epoch",
                                       "stopped", "val", "run_id")}
                c = train.resolve(cfg, model)
                result["configs"][model] = {"model": c.model.model_dump(), "train": c.train.model_dump(exclude={"per_model"}),
                                            "budget_s": budget, "max_epochs": epochs}
            m = evaluate.run(cfg, args.dataset, protocol, model, run_dir=run_dir)
            result[protocol][model] = slim(m)
            details[protocol][model] = {"coverage": m["coverage"], "mrr": {s: m[s]["mrr"] for s in S.SLICES if s in m},
                                        "cases": {s: m[s]["cases"] for s in S.SLICES if s in m},
                                        **({"future": m["future"]} if "future" in m else {})}
            print(f"   {protocol}/{model}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in result[protocol][model]["all"].items())
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    if ablation and "loo" in protocols:
        result["ablation_loo"] = {"learn": result["loo"].get("learn")}
        for name, sets in ABLATION.items():
            print(f"== ablation loo / {name}", flush=True)
            tr = train_subprocess(args.home, args.dataset, "loo", "learn", budget, epochs, args.set + sets)
            m = evaluate.run(cfg, args.dataset, "loo", "learn", run_dir=tr["run_dir"])
            result["ablation_loo"][name] = slim(m)
            result["train"][name] = {"loo": {k: tr[k] for k in ("sequences_per_s", "peak_rss_mb", "epochs_run", "stopped")}}
        result["ablation_loo"]["content_vs_id"] = {
            "content (learn)": result["loo"].get("learn"), "id (sasrec)": result["loo"].get("sasrec"),
            "content + id (learn_hybrid)": result["loo"].get("learn_hybrid")}
    # the flat entry the acceptance shape names: throughput and memory per model (loo run, else temporal)
    for model, by in list(result["train"].items()):
        first = by.get("loo") or next(iter(by.values()))
        by.update({"sequences_per_s": first["sequences_per_s"], "peak_rss_mb": first["peak_rss_mb"]})
    result["details"] = details
    result["meta"] = {
        "mode": "quick" if args.quick else "full", "dataset": args.dataset, "epochs_per_model": epochs,
        "budget_s_cap_per_model": budget,
        "max_users": max_users, "models": models, "protocols": protocols, "ablation": bool(ablation),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_avg_at_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
        "created": datetime.now(timezone.utc).isoformat(), "extra_settings": args.set,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(table(result, protocols, models))
    print(f"\nwrote {args.output} in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
