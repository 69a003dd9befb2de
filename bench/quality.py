"""Recommendation quality on the Amazon Books sample: LEARN, the hybrid, SASRec and baselines, both protocols.

The full run, in order (every choice is made on validation, never on test):

1. throughput: one epoch of each neural kind alone on the machine (training sequences/s);
2. a one-setting-at-a-time sweep of learn_hybrid and SASRec on loo validation (temperature, random
   negatives, logQ, dropout, learning rate; ``--sweep-budget-s`` per run);
3. learn_hybrid's ID dropout on temporal validation, against the content-only model's cold-start recall;
4. every neural model trained to convergence with the chosen settings: early stopping on validation
   Recall@200 (``train.patience`` epochs), ``--epochs`` and ``--budget-s`` as caps; ``--jobs`` training
   processes at a time, one thread each, each in its own process so its peak memory is its own;
5. full-ranking evaluation of every model and baseline with the same harness (``learn_tasks.evaluation.harness``);
6. the LEARN ablation (loo).

    python bench/quality.py --quick      # 1 epoch per model, 4,000 test users per protocol, no sweep
    python bench/quality.py              # the full run above, every test user

Writes ``bench/results/quality_amazon_books.json``:
``{"loo"|"temporal": {model: {slice: {"recall@10", ..., "ndcg@200"}}}, "train": {model: {...}},
"configs": {model: settings}, "sweep": ..., "id_dropout": ..., "chosen": ..., "throughput": ...}``.
A registered dataset is prepared and encoded under LEARN_HOME (``--home``) when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)

from learn_tasks import schema as S  # noqa: E402
from learn_tasks.config import BASELINE_KINDS, MODEL_KINDS, load_settings  # noqa: E402

RESULT = REPO / "bench" / "results" / "quality_amazon_books.json"
NEURAL = MODEL_KINDS
BASELINES = BASELINE_KINDS
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
    epochs_log = [line.split("learn.train ")[-1] for line in proc.stderr.splitlines() if " epoch " in line]
    label = " ".join([protocol, model, *[s.split(".", 3)[-1] for s in sets if s.startswith(f"train.per_model.{model}.")]])
    print(f"   [{label}]\n" + "".join(f"     {line}\n" for line in epochs_log), end="", flush=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def train_many(jobs: int, specs: list[tuple]) -> list[dict]:
    """Run ``train_subprocess(*spec)`` for every spec, ``jobs`` processes at a time (one thread each)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda spec: train_subprocess(*spec), specs))


# One-at-a-time sweep on loo validation (never test): each run changes one setting of the kind's defaults
# (configs/models/<kind>.yaml); a value equal to the default is skipped. Per setting the value with the best
# validation Recall@200 is kept when it beats the defaults.
SWEEP: dict[str, list] = {
    "train.temperature": [0.02, 0.1],
    "train.n_random_negatives": [128, 2048],
    "train.logq": [True],
    "model.dropout": [0.2],
    "train.lr": [1e-3, 3e-3],
}
# learn_hybrid must keep LEARN's cold-start and long-tail strength, which loo validation barely sees (few
# cold items). Its ID dropout, and whether the loo sweep's logQ choice stays (logQ raises recall of popular
# items at the tail's expense), are chosen on temporal validation against the content-only model: the best
# all-items Recall@200 among the candidates whose cold-start Recall@50 is at least COLD_SHARE of the
# content-only model's and whose long-tail Recall@50 is at least its.
ID_DROPOUTS = [0.3, 0.5, 0.7]
COLD_SHARE = 0.9


def _set(kind: str, key: str, value) -> str:
    section, field = key.split(".")
    return f"train.per_model.{kind}.{section}.{field}={json.dumps(value)}"


def sweep(home: str, dataset: str, kinds: list[str], budget: float, epochs: int, sets: list[str], jobs: int) -> dict:
    """Train each variant under loo (``jobs`` at a time) and keep the values that beat the defaults."""
    from learn_tasks.pch.kinds import resolve

    cfg = load_settings(overrides=sets)
    out: dict = {}
    for kind in kinds:
        c = resolve(cfg, kind)
        variants: list[tuple[str, object] | None] = [None]
        for key, values in SWEEP.items():
            section, field = key.split(".")
            variants += [(key, v) for v in values if getattr(getattr(c, section), field) != v]
        results = train_many(jobs, [(home, dataset, "loo", kind, budget, epochs,
                                     sets + ([_set(kind, *v)] if v else [])) for v in variants])
        runs = [{"change": ({v[0]: v[1]} if v else None), "val_recall@200": (tr["val"] or {}).get("recall@200", -1.0),
                 "epochs_run": tr["epochs_run"], "best_epoch": tr["best_epoch"], "stopped": tr["stopped"],
                 "sequences_per_s": tr["sequences_per_s"]} for v, tr in zip(variants, results)]
        base = runs[0]["val_recall@200"]
        chosen: dict = {}
        for key in SWEEP:
            tried = [r for r in runs if r["change"] and key in r["change"]]
            best = max(tried, key=lambda r: r["val_recall@200"], default=None)
            if best is not None and best["val_recall@200"] > base:
                chosen[key] = best["change"][key]
        for r in runs:
            print(f"   sweep {kind} {r['change']}: val recall@200 {r['val_recall@200']:.4f}", flush=True)
        out[kind] = {"runs": runs, "chosen": chosen, "base_val_recall@200": base, "budget_s": budget,
                     "max_epochs": epochs, "protocol": "loo", "stage": "valid"}
    return out


def choose_id_dropout(home: str, dataset: str, budget: float, epochs: int, sets: list[str], jobs: int,
                      logq: bool) -> dict:
    """learn_hybrid's ID dropout (and logQ, when the loo sweep chose it) on temporal validation (see above)."""
    from learn_tasks.evaluation.harness import evaluate_run

    grid = [{"model.id_dropout": p, "train.logq": q} for q in ([True, False] if logq else [False]) for p in ID_DROPOUTS]
    specs = [(home, dataset, "temporal", "learn", budget, epochs, sets)]
    specs += [(home, dataset, "temporal", "learn_hybrid", budget, epochs, sets + [_set("learn_hybrid", k, v)
                                                                                  for k, v in g.items()]) for g in grid]
    results = train_many(jobs, specs)
    cfg = load_settings(overrides=sets + ["evaluate.max_users=0"])

    def valid(kind: str, tr: dict) -> dict:
        m = evaluate_run(cfg, dataset, "temporal", kind, run_dir=tr["run_dir"], stage=S.VALID, write_report=False)
        return {f"{s}_recall@{k}": m[s][f"recall@{k}"] for s in ("all", "cold_start", "long_tail", "head")
                if s in m for k in (50, 200)} | {"users": m["meta"]["users"], "epochs_run": tr["epochs_run"]}

    reference = valid("learn", results[0])
    cold_floor = COLD_SHARE * reference["cold_start_recall@50"]
    tail_floor = reference["long_tail_recall@50"]
    rows = [{**g, **valid("learn_hybrid", tr)} for g, tr in zip(grid, results[1:])]
    ok = [r for r in rows if r["cold_start_recall@50"] >= cold_floor and r["long_tail_recall@50"] >= tail_floor]
    pick = max(ok, key=lambda r: r["all_recall@200"]) if ok else max(rows, key=lambda r: r["cold_start_recall@50"])
    for r in rows:
        r["chosen"] = r is pick
        print(f"   {r['model.id_dropout']=} {r['train.logq']=}: valid cold R@50 {r['cold_start_recall@50']:.4f} "
              f"(floor {cold_floor:.4f}), tail R@50 {r['long_tail_recall@50']:.4f} (floor {tail_floor:.4f}), "
              f"all R@200 {r['all_recall@200']:.4f}", flush=True)
    return {"rule": f"best all recall@200 with temporal-validation cold_start recall@50 >= {COLD_SHARE} x learn's "
                    "and long_tail recall@50 >= learn's (else the best cold_start recall@50)",
            "learn": reference, "runs": rows, "constraints_met": bool(ok),
            "chosen": {k: pick[k] for k in grid[0]}, "budget_s": budget, "max_epochs": epochs}


def throughput(home: str, dataset: str, sets: list[str]) -> dict:
    """Training sequences/s of each neural kind alone on the machine (one epoch, loo, one thread)."""
    out = {}
    for kind in NEURAL:
        tr = train_subprocess(home, dataset, "loo", kind, 0, 1, sets + ["train.val_users=200"])
        out[kind] = {"sequences_per_s": tr["sequences_per_s"], "train_seconds": tr["train_seconds"],
                     "train_sequences": tr["train_sequences"], "peak_rss_mb": tr["peak_rss_mb"]}
        print(f"   throughput {kind}: {tr['sequences_per_s']:.0f} sequences/s", flush=True)
    return out


def chosen_sets(choices: dict[str, dict]) -> list[str]:
    """``{kind: {"section.field": value}}`` -> per-model ``--set`` overrides."""
    return [_set(kind, key, v) for kind, chosen in choices.items() for key, v in chosen.items()]


def deep_merge(old: dict, new: dict) -> dict:
    """``old`` updated with ``new``, nested dicts merged key by key (``meta`` is replaced whole)."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "meta":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
    ap.add_argument("--quick", action="store_true", help="subset of test users, one epoch, no sweep")
    ap.add_argument("--dataset", default="amazon-books-2014-sample")
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"), help="LEARN_HOME with the dataset")
    ap.add_argument("--epochs", type=int, default=None,
                    help="most training epochs per model; early stopping on validation ends runs sooner (quick 1, full 40)")
    ap.add_argument("--budget-s", type=float, default=None, help="cap on training seconds per model (quick 150, full 600)")
    ap.add_argument("--max-users", type=int, default=None, help="test users per protocol (0 = all)")
    ap.add_argument("--models", default=",".join(NEURAL + BASELINES))
    ap.add_argument("--protocols", default="loo,temporal")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the LEARN ablation under loo (default: on in full mode)")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    ap.add_argument("--sweep", default=None,
                    help="comma-separated kinds to sweep on loo validation first (full default learn_hybrid,sasrec; '' = none)")
    ap.add_argument("--id-dropout", action=argparse.BooleanOptionalAction, default=None,
                    help="choose learn_hybrid's ID dropout on temporal validation first (default: on in full mode)")
    ap.add_argument("--sweep-budget-s", type=float, default=120.0, help="training seconds per sweep run")
    ap.add_argument("--sweep-epochs", type=int, default=10, help="most epochs per sweep run")
    ap.add_argument("--jobs", type=int, default=None,
                    help="training processes at a time, one thread each (quick 1, full: the CPU count)")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                    help="first time one epoch of each neural kind alone on the machine (default: on in full mode)")
    ap.add_argument("--merge", action="store_true", help="keep the entries of an existing output this run does not produce")
    ap.add_argument("--ablation-only", action="store_true",
                    help="only the LEARN ablation, next to the `learn` results of the existing output (implies --merge)")
    ap.add_argument("--output", type=Path, default=RESULT)
    hygiene.add_arguments(ap)
    args = ap.parse_args(argv)
    run = hygiene.begin(args)

    full = not args.quick
    if args.ablation_only:  # the other phases and models come from the existing output
        args.merge, args.ablation, args.sweep, args.id_dropout, args.throughput = True, True, "", False, False
        args.models, args.protocols = "", "loo"
    epochs = args.epochs if args.epochs is not None else (40 if full else 1)
    budget = args.budget_s if args.budget_s is not None else (600.0 if full else 150.0)
    max_users = args.max_users if args.max_users is not None else (0 if full else 4000)
    ablation = args.ablation if args.ablation is not None else full
    sweep_kinds = [k for k in (args.sweep if args.sweep is not None else ("learn_hybrid,sasrec" if full else "")).split(",") if k]
    id_dropout = args.id_dropout if args.id_dropout is not None else full
    jobs = args.jobs if args.jobs is not None else ((os.cpu_count() or 1) if full else 1)
    if args.quick:  # a short budget leaves no room for long validations
        args.set = ["train.val_users=1000"] + args.set
    os.environ["LEARN_HOME"] = args.home
    cfg = load_settings(overrides=args.set + [f"evaluate.max_users={max_users}"])
    from learn_tasks.data import public
    from learn_tasks.ceg import encode, store
    from learn_tasks.evaluation.harness import evaluate_run
    from learn_tasks.pch.kinds import resolve

    if args.dataset in public.DATASETS:  # a registered public dataset: fetch and prepare it when missing
        public.ensure_prepared(cfg, args.dataset)
    if store.current_fingerprint(cfg, args.dataset) is None:
        print(f"== encoding {args.dataset} (once)", flush=True)
        encode.encode_catalogue(cfg, args.dataset)

    models = [m for m in args.models.split(",") if m]
    protocols = args.protocols.split(",")
    result: dict = {p: {} for p in protocols}
    details: dict = {p: {} for p in protocols}
    result["train"], result["configs"] = {}, {}
    t_start = time.perf_counter()
    if args.throughput if args.throughput is not None else full:
        print("== throughput (one epoch per kind, alone on the machine)", flush=True)
        result["throughput"] = throughput(args.home, args.dataset, args.set)
    choices: dict[str, dict] = {}
    if sweep_kinds:
        print(f"== sweep on loo validation: {sweep_kinds}, {jobs} at a time", flush=True)
        result["sweep"] = sweep(args.home, args.dataset, sweep_kinds, args.sweep_budget_s, args.sweep_epochs, args.set, jobs)
        choices = {k: dict(v["chosen"]) for k, v in result["sweep"].items()}
    if id_dropout:
        print("== learn_hybrid ID dropout on temporal validation", flush=True)
        result["id_dropout"] = choose_id_dropout(args.home, args.dataset, args.sweep_budget_s, args.sweep_epochs,
                                                 args.set + chosen_sets(choices), jobs,
                                                 logq=resolve(load_settings(overrides=args.set + chosen_sets(choices)),
                                                              "learn_hybrid").train.logq)
        choices.setdefault("learn_hybrid", {}).update(result["id_dropout"]["chosen"])
    if choices:
        result["chosen"] = choices
        args.set = args.set + chosen_sets(choices)
        cfg = load_settings(overrides=args.set + [f"evaluate.max_users={max_users}"])

    neural = [(p, m) for p in protocols for m in models if m in NEURAL]
    print(f"== training {len(neural)} model(s), {jobs} at a time, up to {epochs} epochs / {budget:.0f} s each", flush=True)
    trained = dict(zip(neural, train_many(jobs, [(args.home, args.dataset, p, m, budget, epochs, args.set)
                                                  for p, m in neural])))
    for (protocol, model), tr in trained.items():
        result["train"].setdefault(model, {})[protocol] = {
            k: tr[k] for k in ("sequences_per_s", "peak_rss_mb", "train_seconds", "epochs_run", "best_epoch",
                               "stopped", "val", "run_id")}
        c = resolve(cfg, model)
        result["configs"][model] = {"model": c.model.model_dump(), "train": c.train.model_dump(exclude={"per_model"}),
                                    "budget_s": budget, "max_epochs": epochs}
    for protocol in protocols:
        for model in models:
            t0 = time.perf_counter()
            tr = trained.get((protocol, model))
            m = evaluate_run(cfg, args.dataset, protocol, model, run_dir=tr["run_dir"] if tr else None)
            result[protocol][model] = slim(m)
            details[protocol][model] = {"coverage": m["coverage"], "mrr": {s: m[s]["mrr"] for s in S.SLICES if s in m},
                                        "cases": {s: m[s]["cases"] for s in S.SLICES if s in m},
                                        **({"future": m["future"]} if "future" in m else {})}
            print(f"   {protocol}/{model}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in result[protocol][model]["all"].items())
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    if ablation and "loo" in protocols:
        print("== ablation (loo)", flush=True)
        previous = json.loads(args.output.read_text(encoding="utf-8")) if args.ablation_only else {}
        for key in ("learn", "sasrec", "learn_hybrid"):  # the reference rows of the ablation table
            if key not in result["loo"] and key in previous.get("loo", {}):
                result["loo"][key] = previous["loo"][key]
        result["ablation_loo"] = {"learn": result["loo"].get("learn")}
        runs = train_many(jobs, [(args.home, args.dataset, "loo", "learn", budget, epochs, args.set + sets)
                                 for sets in ABLATION.values()])
        for name, tr in zip(ABLATION, runs):
            m = evaluate_run(cfg, args.dataset, "loo", "learn", run_dir=tr["run_dir"])
            result["ablation_loo"][name] = slim(m)
            result["train"][name] = {"loo": {k: tr[k] for k in ("sequences_per_s", "peak_rss_mb", "epochs_run",
                                                                 "best_epoch", "stopped")}}
        result["ablation_loo"]["content_vs_id"] = {
            "content (learn)": result["loo"].get("learn"), "id (sasrec)": result["loo"].get("sasrec"),
            "content + id (learn_hybrid)": result["loo"].get("learn_hybrid")}
    # the flat entry the acceptance shape names: throughput and memory per model (loo run, else temporal)
    for model, by in list(result["train"].items()):
        first = by.get("loo") or next(iter(by.values()))
        by.update({"sequences_per_s": first["sequences_per_s"], "peak_rss_mb": first["peak_rss_mb"]})
        if model in result.get("throughput", {}):
            by["sequences_per_s_alone"] = result["throughput"][model]["sequences_per_s"]
    result["details"] = details
    result["meta"] = {
        "mode": "quick" if args.quick else "full", "dataset": args.dataset, "max_epochs_per_model": epochs,
        "budget_s_cap_per_model": budget, "patience": cfg.train.patience, "jobs": jobs,
        "max_users": max_users, "models": models, "protocols": protocols, "ablation": bool(ablation),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_avg_at_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
        "created": datetime.now(timezone.utc).isoformat(), "extra_settings": args.set,
    }
    if args.merge and args.output.exists():  # the earlier run's meta stays; this run's goes beside it
        result[f"meta_{'ablation' if args.ablation_only else 'update'}"] = result.pop("meta")
        result = deep_merge(json.loads(args.output.read_text(encoding="utf-8")), result)
    earlier_noisy = bool(result.get("noisy"))  # a merged file is only as clean as its noisiest run
    result.update(run.finish())
    result["noisy"] = result["noisy"] or earlier_noisy
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(table(result, protocols, models))
    print(f"\nwrote {args.output} in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
