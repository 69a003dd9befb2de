"""Recommendation quality: LEARN, the hybrid, SASRec and the baselines under both protocols, tuned on validation.

    python bench/quality.py --quick --dataset movielens-latest-small   # a smoke run: minutes on 2 cores
    python bench/quality.py --dataset amazon-books-2014-sample         # the full run

For each protocol (``loo``, ``temporal``), every choice is made on that protocol's validation cases, never
on test:

1. baselines: ``recent_popular``'s window in days and ``item_knn``'s neighbours, each from a grid;
2. every neural kind: successive halving over its search space with the same budget in epochs for every
   kind, on the whole validation set (``learn_tasks/training/tuning.py``);
3. the chosen configuration's final runs, one per seed: early stopping on validation after ``--patience``
   rounds without improvement (``--max-epochs`` caps it), then a refit on train + valid for the epochs
   validation chose (``--no-refit``: the early-stopped model is tested); ``learn_hybrid``'s evidence
   weighting (``mix_k``) is chosen on the validation runs;
4. test: every model and baseline on the same cases. Per slice the mean over seeds and cases with a
   bootstrap 95% interval, catalogue coverage@10, and paired differences of ``learn_hybrid`` (the product
   default) against ``sasrec``, ``learn`` and ``recent_popular``.

Training budgets are epochs; ``--budget-s`` (off by default) may stop a run early but never changes its
schedule, and the results do not depend on ``--jobs`` or on the machine's load.

Writes ``bench/results/quality_<dataset>[_quick].json`` (``amazon_books``, ``movielens``):
``{"loo"|"temporal": {model: {slice: {"recall@K", "recall@K_ci", "ndcg@K", "ndcg@K_ci", "cases"}}},
"diffs", "coverage", "cold_pool", "seeds", "final", "selection", "timing", "complete", "meta"}`` plus the hygiene keys
(``noisy``, ``load_avg``, ``commit``, ``command``, ``hygiene``). The file is written after each protocol, so a
run cut short keeps what it finished (``"complete": false``, ``meta.protocols_done``). ``python bench/tables.py`` turns the
files into the tables of docs/results.md and README.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402  (bench/hygiene.py: quiet machine, noisy flag, commit, command)

import numpy as np  # noqa: E402

from learn_tasks import schema as S  # noqa: E402
from learn_tasks.ceg import encode, store  # noqa: E402
from learn_tasks.config import BASELINE_KINDS, MODEL_KINDS, load_settings  # noqa: E402
from learn_tasks.data import public  # noqa: E402
from learn_tasks.data.splits import load_split  # noqa: E402
from learn_tasks.evaluation import compare  # noqa: E402
from learn_tasks.storage import write_json  # noqa: E402
from learn_tasks.training import tuning  # noqa: E402

RESULTS = REPO / "bench" / "results"
NEURAL = MODEL_KINDS
BASELINES = BASELINE_KINDS
PRODUCT = "learn_hybrid"
PAIRS = [(PRODUCT, "sasrec"), (PRODUCT, "learn"), (PRODUCT, "recent_popular")]
NAMES = {"amazon-books-2014-sample": "amazon_books", "movielens-latest-small": "movielens"}
# Grids chosen from on validation.
RECENT_DAYS = [7.0, 30.0, 90.0, 365.0, 0.0]  # 0 = every event known at the time
KNN_NEIGHBOURS = [20, 50, 100, 200, 500]
MIX_K = [0.0, 5.0, 10.0, 20.0, 50.0, 100.0]
COLD_SHARE = 0.9  # mix_k must keep this share of the content-only model's validation cold-start recall
# (first rung's epochs, the final runs' epoch cap): a MovieLens epoch is one window per user (610 users),
# about a twentieth of an Amazon epoch, so its rungs are longer (27 x 5, 9 x 15 and 3 x 45 epochs with 27
# configurations and eta 3: about 26 minutes of a 2-core machine per protocol for the three kinds; the
# final runs, early-stopped within 300 epochs, take longer).
EPOCHS = {"movielens-latest-small": (5, 300)}
DEFAULT_EPOCHS = (1, 60)
FULL = {"configs": 27, "eta": 3, "max_users": 0, "val_users": 0, "train_users": 0}
QUICK = {"configs": 4, "eta": 2, "max_users": 300, "val_users": 300, "train_users": 1500,
         "min_epochs": 1, "max_epochs": 4}


def output_name(dataset: str, quick: bool) -> str:
    """``quality_<normalised dataset>[_quick].json``."""
    norm = NAMES.get(dataset) or re.sub(r"[^a-z0-9]+", "_", dataset.lower()).strip("_")
    return f"quality_{norm}{'_quick' if quick else ''}.json"


class Bench:
    """The run's settings, worker pool and what it records."""

    def __init__(self, args: argparse.Namespace, cfg, pool: ProcessPoolExecutor):
        self.args, self.cfg, self.pool = args, cfg, pool
        self.metric = cfg.train.early_stop_metric
        self.budget_stops: list[dict] = []
        self.timing: dict = {}

    def log(self, msg: str) -> None:
        hygiene.log(msg)

    def train(self, jobs: list[tuning.TrainJob]) -> list[dict]:
        out = list(self.pool.map(tuning.run_job, jobs))
        for job, res in zip(jobs, out):
            t = self.timing.setdefault(job.protocol, {}).setdefault(job.kind, {
                "runs": 0, "epochs": 0, "train_s": 0.0, "setup_s": 0.0, "wall_s": 0.0, "val_rounds": 0})
            # validation rounds: every epoch of a final run, one per search trial, none in a refit
            rounds = (res["epochs_run"] if job.params.get("train.val_every") == 1 else 1) if res["val_users"] else 0
            t["runs"] += 1
            t["epochs"] += res["epochs_run"]
            t["train_s"] += res["train_seconds"]
            t["setup_s"] += res["setup_seconds"]
            t["wall_s"] += res["wall_s"]
            t["val_rounds"] += rounds
            if res["stopped"] == "budget":
                self.budget_stops.append({"protocol": job.protocol, "kind": job.kind, "epochs_run": res["epochs_run"],
                                          "epochs": job.epochs, "params": job.params})
        return out

    def evaluate(self, jobs: list[tuning.EvalJob]) -> list[dict]:
        return list(self.pool.map(tuning.run_eval, jobs))

    def eval_cfg(self, stage: str, **evaluate):
        users = self.args.val_users if stage == S.VALID else self.args.max_users
        return self.cfg.with_overrides(evaluate={"max_users": users, **evaluate})

    # ------------------------------------------------------------------------------- baselines
    def choose_baselines(self, protocol: str) -> dict:
        """recent_popular's days and item_knn's neighbours on validation."""
        out = {}
        for model, field, grid in (("recent_popular", "recent_days", RECENT_DAYS),
                                   ("item_knn", "knn_neighbours", KNN_NEIGHBOURS)):
            res = self.evaluate([tuning.EvalJob(self.eval_cfg(S.VALID, **{field: v}), self.args.dataset, protocol,
                                                model, stage=S.VALID) for v in grid])
            by = {v: r for v, r in zip(grid, res)}
            out[model] = {"setting": f"evaluate.{field}", **tuning.choose_value(
                grid, lambda v: {self.metric: by[v]["all"][self.metric], "ndcg@10": by[v]["all"]["ndcg@10"]},
                self.metric)}
            self.log(f"{protocol}: {model} {field} = {out[model]['chosen']}")
        return out

    # ------------------------------------------------------------------------------- search
    def search(self, protocol: str, kind: str, plan: tuning.Plan, users) -> dict:
        a = self.args
        candidates = tuning.sample_configs(self.cfg, kind, plan.configs, seed=a.search_seed)

        def run(pairs):
            jobs = [tuning.TrainJob(self.cfg, a.dataset, protocol, kind,
                                    {**params, **tuning.trial_controls(epochs, a.max_epochs, a.search_seed, a.val_users)},
                                    epochs, a.budget_s, users, keep=False) for params, epochs in pairs]
            return [{"score": (r["val_last"] or {}).get(self.metric), "val": r["val_last"], "epochs_run": r["epochs_run"],
                     "stopped": r["stopped"], "train_seconds": round(r["train_seconds"], 2)} for r in self.train(jobs)]

        result = tuning.successive_halving(candidates, plan, run, say=lambda m: self.log(f"{protocol}/{kind}: {m}"))
        result.update({"metric": self.metric, "space": tuning.SPACES[kind], "space_size": len(tuning.space_configs(kind)),
                       "schedule_epochs": a.max_epochs, "validation_users": a.val_users or "all"})
        return result

    # ------------------------------------------------------------------------------- final runs
    def finals(self, protocol: str, chosen: dict[str, dict], users) -> dict:
        """Per kind and seed: early stopping on validation, then (``--refit``) train + valid for its best epochs."""
        a = self.args
        specs = [(kind, seed) for kind in NEURAL for seed in a.seed_list]
        es = self.train([tuning.TrainJob(self.cfg, a.dataset, protocol, kind,
                                         {**chosen[kind], **tuning.final_controls(a.max_epochs, seed, a.val_users, a.patience)},
                                         a.max_epochs, a.budget_s, users) for kind, seed in specs])
        out = {kind: {"params": chosen[kind], "runs": []} for kind in NEURAL}
        for (kind, seed), r in zip(specs, es):
            out[kind]["runs"].append({"seed": seed, "valid_run": r["run_dir"], "best_epoch": r["best_epoch"],
                                      "epochs_run": r["epochs_run"], "stopped": r["stopped"], "val": r["val_last"],
                                      "train_seconds": round(r["train_seconds"], 2)})
        if a.refit:
            refits = self.train([tuning.TrainJob(self.cfg, a.dataset, protocol, kind,
                                                 {**chosen[kind], **tuning.refit_controls(a.max_epochs, seed)},
                                                 max(1, r["best_epoch"]), a.budget_s, users)
                                 for (kind, seed), r in zip(specs, es)])
            for (kind, seed), r in zip(specs, refits):
                run = next(x for x in out[kind]["runs"] if x["seed"] == seed)
                run.update({"test_run": r["run_dir"], "refit_epochs": r["epochs_run"], "refit_stopped": r["stopped"]})
        for kind in NEURAL:
            for run in out[kind]["runs"]:
                run.setdefault("test_run", run["valid_run"])
        return out

    def choose_mix_k(self, protocol: str, finals: dict) -> dict:
        """learn_hybrid's evidence weighting on validation: the best all-items metric among the values that keep
        COLD_SHARE of the content-only model's cold-start figure (when validation has cold-start cases)."""
        a, m = self.args, self.metric
        hybrid = [r["valid_run"] for r in finals[PRODUCT]["runs"]]
        learn = [r["valid_run"] for r in finals["learn"]["runs"]]
        jobs = [tuning.EvalJob(self.eval_cfg(S.VALID), a.dataset, protocol, "learn", run, S.VALID) for run in learn]
        jobs += [tuning.EvalJob(self.eval_cfg(S.VALID), a.dataset, protocol, PRODUCT, run, S.VALID, {"mix_k": k})
                 for k in MIX_K for run in hybrid]
        res = self.evaluate(jobs)
        ref, rest = res[:len(learn)], res[len(learn):]

        def mean(results, s):
            vals = [r[s][m] for r in results if s in r]
            return float(np.mean(vals)) if vals else None

        floor = mean(ref, S.SLICE_COLD_START)
        floor = COLD_SHARE * floor if floor is not None else None
        by = {k: rest[i * len(hybrid):(i + 1) * len(hybrid)] for i, k in enumerate(MIX_K)}
        choice = tuning.choose_value(
            MIX_K, lambda k: {m: mean(by[k], S.SLICE_ALL), f"cold_start_{m}": mean(by[k], S.SLICE_COLD_START)}, m,
            admissible=None if floor is None else (lambda r: (r[f"cold_start_{m}"] or 0.0) >= floor),
            fallback_key=f"cold_start_{m}")
        self.log(f"{protocol}: learn_hybrid mix_k = {choice['chosen']} (cold-start floor {floor})")
        return {**choice, "cold_start_floor": floor, "rule": f"best all-items validation {m} among the values whose "
                f"cold-start {m} is at least {COLD_SHARE} x the content-only learn model's (mean over seeds)"}

    # ------------------------------------------------------------------------------- one protocol
    def protocol(self, protocol: str, plan: tuning.Plan, result: dict) -> None:
        a = self.args
        users = self.train_users(protocol)
        selection = {"metric": self.metric, "stage": S.VALID}
        self.log(f"== {protocol}: baselines on validation")
        selection.update(self.choose_baselines(protocol))
        self.log(f"== {protocol}: search, {plan.configs} configurations per kind, {plan.budget_epochs} epochs each kind")
        with ThreadPoolExecutor(max_workers=len(NEURAL)) as threads:  # the kinds' rungs share the worker pool
            searches = dict(zip(NEURAL, threads.map(lambda k: self.search(protocol, k, plan, users), NEURAL)))
        selection.update(searches)
        self.log(f"== {protocol}: final runs, seeds {a.seed_list}")
        finals = self.finals(protocol, {k: searches[k]["chosen"] for k in NEURAL}, users)
        selection["mix_k"] = self.choose_mix_k(protocol, finals)
        self.log(f"== {protocol}: test")
        jobs, owners = [], []
        for kind in NEURAL:
            over = {"mix_k": selection["mix_k"]["chosen"]} if kind == PRODUCT else None
            for run in finals[kind]["runs"]:
                jobs.append(tuning.EvalJob(self.eval_cfg(S.TEST), a.dataset, protocol, kind, run["test_run"], S.TEST, over))
                owners.append(kind)
        chosen_eval = {"recent_popular": {"recent_days": selection["recent_popular"]["chosen"]},
                       "item_knn": {"knn_neighbours": selection["item_knn"]["chosen"]}}
        for model in BASELINES:
            jobs.append(tuning.EvalJob(self.eval_cfg(S.TEST, **chosen_eval.get(model, {})), a.dataset, protocol, model))
            owners.append(model)
        per_model: dict[str, list] = {}
        for model, r in zip(owners, self.evaluate(jobs)):
            per_model.setdefault(model, []).append(r)
        metrics = [f"{name}@{k}" for k in self.cfg.evaluate.ks for name in ("recall", "ndcg")]
        summary = compare.summarise(per_model, metrics, PAIRS, a.n_boot, seed=0)
        result[protocol] = summary["models"]
        result["diffs"][protocol] = summary["diffs"]
        result["coverage"][protocol] = {
            model: {"coverage@10": float(np.mean([r["coverage"]["coverage@10"] for r in rs])),
                    "per_seed": [r["coverage"]["coverage@10"] for r in rs],
                    "cold_start_share@10": float(np.mean([r["coverage"]["cold_start_share@10"] for r in rs])),
                    "long_tail_share@10": float(np.mean([r["coverage"]["long_tail_share@10"] for r in rs]))}
            for model, rs in per_model.items()}
        meta = per_model["popular"][0]["meta"]
        result["cold_pool"][protocol] = {"test": meta["cold_pool"], "items": meta["items"]}
        result["users"][protocol] = {"test": meta["users"], "test_available": meta["users_available"],
                                     "train_users": len(users) if users is not None else "all"}
        for kind in NEURAL:
            for run in finals[kind]["runs"]:
                for key in ("valid_run", "test_run"):
                    run[key] = Path(run[key]).name if run.get(key) else None
        result["final"][protocol] = finals
        result["selection"][protocol] = selection
        for model in (PRODUCT, "sasrec", "learn", "recent_popular"):
            m = result[protocol][model]["all"]
            self.log(f"{protocol}/{model}: recall@10 {m['recall@10']:.4f} {m['recall@10_ci']}, ndcg@10 {m['ndcg@10']:.4f}")

    def train_users(self, protocol: str):
        """A seeded sample of training users (``--train-users``; None = every user)."""
        if not self.args.train_users:
            return None
        split = load_split(self.cfg, self.args.dataset, protocol)
        ids = np.unique(split.loc[split[S.SPLIT] == S.TRAIN, S.USER_ID].to_numpy())
        if len(ids) <= self.args.train_users:
            return None
        return np.sort(np.random.default_rng(0).choice(ids, size=self.args.train_users, replace=False))


def plain(obj):
    """``obj`` with numpy scalars and arrays as Python numbers and lists (JSON would write them as strings)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    return obj.item() if isinstance(obj, np.generic) else obj


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 configurations, epochs 1-4, user samples, still every seed; writes *_quick.json")
    ap.add_argument("--dataset", default="amazon-books-2014-sample", help="a prepared or registered public dataset")
    ap.add_argument("--home", default=os.environ.get("LEARN_HOME", ".learn"), help="LEARN_HOME with the dataset")
    ap.add_argument("--protocols", default="loo,temporal")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of every final configuration (>= 3)")
    ap.add_argument("--configs", type=int, default=None, help="configurations drawn per kind (full 27, quick 4)")
    ap.add_argument("--eta", type=int, default=None, help="successive halving factor (full 3, quick 2)")
    ap.add_argument("--min-epochs", type=int, default=None, help="epochs of the first rung (dataset default)")
    ap.add_argument("--max-epochs", type=int, default=None,
                    help="epoch cap of the final runs and length of every run's step schedule (dataset default)")
    ap.add_argument("--patience", type=int, default=10, help="validation rounds without improvement (>= 10 in full runs)")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                    help="refit on train + valid for the epochs validation chose before testing")
    ap.add_argument("--max-users", type=int, default=None, help="test users per protocol (0 = all; quick 300)")
    ap.add_argument("--val-users", type=int, default=None, help="validation users (0 = all; quick 300)")
    ap.add_argument("--train-users", type=int, default=None, help="training users sampled (0 = all; quick 1500)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock cap per training run (0 = none): it may stop a run, never change its schedule")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes, one thread each (default: CPU count)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates")
    ap.add_argument("--search-seed", type=int, default=0, help="seed of the configuration draw and of search trials")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    hygiene.add_arguments(ap)
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    min_e, max_e = (QUICK["min_epochs"], QUICK["max_epochs"]) if args.quick else EPOCHS.get(args.dataset, DEFAULT_EPOCHS)
    for key, default in (("configs", profile["configs"]), ("eta", profile["eta"]), ("min_epochs", min_e),
                         ("max_epochs", max_e), ("max_users", profile["max_users"]),
                         ("val_users", profile["val_users"]), ("train_users", profile["train_users"])):
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.protocol_list = [p for p in args.protocols.split(",") if p]
    if not args.protocol_list or set(args.protocol_list) - {"loo", "temporal"}:
        ap.error(f"--protocols: a comma-separated list of loo and temporal, not {args.protocols!r}")
    if args.seeds < 3:
        ap.error("--seeds must be at least 3: intervals carry seed-to-seed noise")
    if not args.quick and args.patience < 10:
        ap.error("a full run trains to convergence: --patience must be at least 10 validation rounds")
    args.seed_list = list(range(args.seeds))
    args.jobs = args.jobs or max(1, os.cpu_count() or 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run = hygiene.begin(args)
    t_start = time.perf_counter()
    os.environ["LEARN_HOME"] = args.home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_settings(overrides=args.set)
    if args.dataset in public.DATASETS:  # a registered public dataset: fetch (mirror) and prepare it when missing
        public.ensure_prepared(cfg, args.dataset)
    if store.current_fingerprint(cfg, args.dataset) is None:
        hygiene.log(f"encoding {args.dataset} (once)")
        encode.encode_catalogue(cfg, args.dataset)
    protocols = args.protocol_list
    for protocol in protocols:  # cache the splits before the workers read them
        load_split(cfg, args.dataset, protocol)
    plan = tuning.Plan(args.configs, args.min_epochs, args.eta)
    if plan.max_epochs > args.max_epochs:
        raise SystemExit(f"the search's longest rung ({plan.max_epochs} epochs) exceeds --max-epochs {args.max_epochs}")
    result: dict = {"diffs": {}, "coverage": {}, "cold_pool": {}, "users": {}, "final": {}, "selection": {},
                    "seeds": {kind: args.seed_list for kind in NEURAL}}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=tuning.worker_init) as pool:
        bench = Bench(args, cfg, pool)
        for n, protocol in enumerate(protocols, 1):
            bench.protocol(protocol, plan, result)
            # Written after every protocol, so a run cut short keeps the protocols it finished; "complete"
            # says whether every protocol asked for is in the file.
            out = write_result(result, bench, args, cfg, run, plan, protocols[:n], protocols, t_start)
    print(f"wrote {out.relative_to(REPO)} in {time.perf_counter() - t_start:.0f}s (noisy: {result['noisy']})")
    return 0


def write_result(result: dict, bench: Bench, args: argparse.Namespace, cfg, run, plan: tuning.Plan,
                 done: list[str], protocols: list[str], t_start: float) -> Path:
    """Add timing, meta and the hygiene keys to ``result`` and write it (atomically) to its results file."""
    result["timing"] = {p: {k: {**t, "train_s_per_epoch": t["train_s"] / max(t["epochs"], 1),
                                "other_s_per_run": (t["wall_s"] - t["train_s"]) / max(t["runs"], 1)}
                            for k, t in by.items()} for p, by in bench.timing.items()}
    result["budget_stops"] = bench.budget_stops
    result["complete"] = done == protocols
    result["meta"] = {
        "mode": "quick" if args.quick else "full", "dataset": args.dataset, "protocols": protocols,
        "protocols_done": done,
        "plan": plan.to_dict(), "max_epochs": args.max_epochs, "patience": args.patience, "refit": args.refit,
        "seeds": args.seed_list, "max_users": args.max_users, "val_users": args.val_users,
        "train_users": args.train_users, "budget_s": args.budget_s, "jobs": args.jobs, "n_boot": args.n_boot,
        "metric": cfg.train.early_stop_metric, "ks": list(cfg.evaluate.ks), "pairs": [f"{a}_vs_{b}" for a, b in PAIRS],
        "extra_settings": args.set, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "wall_s": round(time.perf_counter() - t_start, 1),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    result.update(run.finish())
    out = RESULTS / output_name(args.dataset, args.quick)
    write_json(plain(result), out)
    hygiene.log(f"{out.relative_to(REPO)}: protocols {', '.join(done)} of {', '.join(protocols)} written")
    return out


if __name__ == "__main__":
    sys.exit(main())
