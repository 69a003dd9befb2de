"""Hyper-parameter search on validation, with a compute budget counted in epochs, never in seconds.

Every choice is made on the validation cases of the protocol the model is then tested under; test cases
are never looked at.

* :data:`SPACES`: the settings searched for each neural kind and their values. The three spaces have the
  same shape (dropout, width, depth, learning rate, loss, logQ, weight decay), plus the softmax
  temperature of the cosine-similarity kinds and ``learn_hybrid``'s ID dropout. logQ only changes a loss
  whose negatives follow popularity (in-batch negatives: ``next_item``, ``dense_all_action``), so a
  configuration with another loss is searched without it (:func:`canonical`); the sampled softmax of the
  SASRec space is therefore ``next_item`` (in-batch plus uniform negatives), where logQ has an effect.
* :class:`Plan` and :func:`successive_halving`: ``configs`` configurations drawn at random (seeded) from
  the space, the kind's current settings (``configs/models/<kind>.yaml``) always among them. Rung *i*
  trains the ``configs // eta**i`` best of the previous rung for ``min_epochs * eta**i`` epochs, each from
  scratch on the same step schedule (``train.schedule_epochs`` = the final runs' epoch cap), so a rung's
  run is exactly the beginning of the final run of that configuration; rungs continue while at least two
  configurations are left, and the best of the last rung is chosen. The budget, ``sum(n_i * r_i)``
  epochs, depends only on the plan, so every kind gets the same one.
* :class:`TrainJob` / :func:`run_job` and :class:`EvalJob` / :func:`run_eval`: one training run (a search
  trial, a final run, a refit) or one evaluation in a picklable form, so a caller can spread them over
  worker processes; the results do not depend on how many run at once.
* :func:`choose_value`: one setting chosen from a grid on validation (a baseline's window or neighbour
  count, ``learn_hybrid``'s evidence weighting), with an optional floor a candidate must clear.
"""
from __future__ import annotations

import itertools
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from learn_tasks import schema as S
from learn_tasks.config import MODEL_KINDS, Settings
from learn_tasks.evaluation.harness import evaluate_run
from learn_tasks.pch import kinds
from learn_tasks.training.train import train_model

LOGQ_LOSSES = ("dense_all_action", "next_item")  # losses with in-batch negatives, where logQ changes anything

_CONTENT_SPACE: dict[str, list[Any]] = {
    "model.dropout": [0.1, 0.3],
    "model.d_model": [64, 128],
    "model.n_layers": [2, 4],
    "train.lr": [1e-3, 3e-3],
    "train.loss": ["dense_all_action", "next_item"],
    "train.logq": [False, True],
    "train.weight_decay": [0.0, 0.01],
    "train.temperature": [0.05, 0.1],
}
SPACES: dict[str, dict[str, list[Any]]] = {
    "learn": dict(_CONTENT_SPACE),
    "learn_hybrid": {**_CONTENT_SPACE, "model.id_dropout": [0.1, 0.3, 0.5]},
    # SASRec around its published settings: inner-product scores (temperature 1), no output projection.
    "sasrec": {
        "model.dropout": [0.2, 0.5],
        "model.d_model": [50, 64],
        "model.n_layers": [2, 4],
        "train.lr": [5e-4, 1e-3],
        "train.loss": ["bce", "next_item", "full_softmax"],
        "train.logq": [False, True],
        "train.weight_decay": [0.0, 0.01],
    },
}
# Settings that must follow a searched one: SASRec's blocks have no output projection, so the embedding
# width is the model width.
TIED: dict[str, dict[str, tuple[str, ...]]] = {"sasrec": {"model.d_model": ("model.out_dim",)}}


# ==================================================================================================
# Search spaces
# ==================================================================================================
def _check_kind(kind: str) -> None:
    if kind not in SPACES:
        raise ValueError(f"no search space for {kind!r}; searchable kinds are {sorted(SPACES)}")


def canonical(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with logQ switched off where the loss has no in-batch negatives (it would change nothing)."""
    out = dict(params)
    if out.get("train.logq") and out.get("train.loss") not in LOGQ_LOSSES:
        out["train.logq"] = False
    return out


def space_configs(kind: str) -> list[dict[str, Any]]:
    """Every distinct configuration of the kind's space, in a fixed order."""
    _check_kind(kind)
    keys = list(SPACES[kind])
    seen: dict[tuple, dict[str, Any]] = {}
    for values in itertools.product(*(SPACES[kind][k] for k in keys)):
        params = canonical(dict(zip(keys, values)))
        seen.setdefault(tuple(params[k] for k in keys), params)
    return list(seen.values())


def current_params(cfg: Settings, kind: str) -> dict[str, Any]:
    """The kind's current values of its searched settings (``configs/models/<kind>.yaml`` and overrides)."""
    _check_kind(kind)
    c = kinds.resolve(cfg, kind)
    return canonical({key: getattr(getattr(c, key.split(".")[0]), key.split(".")[1]) for key in SPACES[kind]})


def sample_configs(cfg: Settings, kind: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct configurations: the kind's current settings first, then a seeded random draw of the
    rest of the space (``n`` larger than the space gives all of it)."""
    if n < 1:
        raise ValueError(f"a search needs at least one configuration, got {n}")
    first = current_params(cfg, kind)
    rest = [p for p in space_configs(kind) if p != first]
    pick = np.random.default_rng(seed).choice(len(rest), size=min(n - 1, len(rest)), replace=False)
    return [first] + [rest[i] for i in sorted(pick)]


def section_overrides(kind: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"section.field": value}`` -> ``{"model": {...}, "train": {...}}``, tied settings included."""
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in params.items():
        for name in (key, *TIED.get(kind, {}).get(key, ())):
            section, fld = name.split(".")
            if section not in out:
                raise ValueError(f"{key!r}: only model.* and train.* settings can be searched")
            out[section][fld] = value
    return out


def with_params(cfg: Settings, kind: str, params: dict[str, Any]) -> Settings:
    """Settings with ``params`` as the kind's per-model overrides (the last layer of :func:`kinds.resolve`)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"{kind!r} is not a trainable kind; choose one of {MODEL_KINDS}")
    return cfg.with_overrides(train={"per_model": {kind: section_overrides(kind, params)}})


# ==================================================================================================
# Successive halving
# ==================================================================================================
@dataclass(frozen=True)
class Plan:
    """Successive halving: ``configs`` candidates, the first rung ``min_epochs`` epochs each, ``eta`` x
    fewer candidates and ``eta`` x more epochs per rung, while at least two candidates are left."""

    configs: int
    min_epochs: int
    eta: int = 3

    def __post_init__(self) -> None:
        if self.configs < 1 or self.min_epochs < 1 or self.eta < 2:
            raise ValueError(f"a plan needs configs >= 1, min_epochs >= 1 and eta >= 2, got {self}")

    def rungs(self) -> list[tuple[int, int]]:
        """``[(candidates, epochs each)]`` per rung (none when there is only one candidate)."""
        out, n, r = [], self.configs, self.min_epochs
        while n >= 2:
            out.append((n, r))
            n, r = n // self.eta, r * self.eta
        return out

    @property
    def budget_epochs(self) -> int:
        """Training epochs the whole search costs (the same for every kind searched with this plan)."""
        return sum(n * r for n, r in self.rungs())

    @property
    def max_epochs(self) -> int:
        """The longest rung's epochs (0 without a search)."""
        return max((r for _, r in self.rungs()), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rungs": [{"candidates": n, "epochs": r} for n, r in self.rungs()],
                "budget_epochs": self.budget_epochs}


def _score(result: dict[str, Any]) -> float:
    s = result.get("score")
    return float(s) if s is not None and math.isfinite(s) else -math.inf


def successive_halving(candidates: Sequence[dict[str, Any]], plan: Plan,
                       run: Callable[[list[tuple[dict[str, Any], int]]], list[dict[str, Any]]],
                       say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the plan over ``candidates`` (``len == plan.configs``).

    ``run([(params, epochs), ...])`` trains and validates each pair (in any order, in parallel if it
    likes) and returns one dict per pair with ``score`` (the validation metric; None or NaN ranks last)
    and whatever else it wants recorded. Ties keep the earlier candidate. Returns the plan, every trial,
    the candidates and the chosen one.
    """
    if len(candidates) != plan.configs:
        raise ValueError(f"the plan is for {plan.configs} candidates, got {len(candidates)}")
    alive = list(range(len(candidates)))
    trials: list[dict[str, Any]] = []
    for rung, (n, epochs) in enumerate(plan.rungs()):
        results = run([(dict(candidates[i]), epochs) for i in alive])
        if len(results) != len(alive):
            raise ValueError(f"rung {rung}: {len(alive)} trials, {len(results)} results")
        for i, res in zip(alive, results):
            trials.append({"rung": rung, "candidate": i, "epochs": epochs, **res})
        order = sorted(range(len(alive)), key=lambda j: (-_score(results[j]), alive[j]))
        if say:
            best = results[order[0]]
            say(f"rung {rung}: {len(alive)} x {epochs} epoch(s); best candidate {alive[order[0]]} "
                f"score {_score(best):.4f}")
        alive = [alive[j] for j in order[:max(1, n // plan.eta)]]
    chosen = alive[0]
    return {"plan": plan.to_dict(), "candidates": [dict(c) for c in candidates], "trials": trials,
            "chosen_index": chosen, "chosen": dict(candidates[chosen]),
            "epochs_trained": int(sum(t.get("epochs_run", t["epochs"]) for t in trials))}


# ==================================================================================================
# Jobs for worker processes
# ==================================================================================================
def worker_init(threads: int = 1) -> None:
    """Worker-process start: ``threads`` torch threads, so parallel workers do not oversubscribe the CPU."""
    torch.set_num_threads(max(1, threads))


@dataclass(frozen=True)
class TrainJob:
    """One training run: the kind's ``params`` (searched settings and run controls, ``section.field``) over
    ``cfg``; ``users`` limits the training sequences; ``keep=False`` removes the run folder afterwards (a
    search trial needs only its validation figures)."""

    cfg: Settings
    dataset: str
    protocol: str
    kind: str
    params: dict[str, Any]
    epochs: int
    budget_s: float = 0.0
    users: np.ndarray | None = None
    keep: bool = True
    embeddings: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def run_job(job: TrainJob) -> dict[str, Any]:
    """Train ``job``; its summary (:func:`train_model`) plus ``val_last`` (the validation metrics of the
    kept epoch, without the ``val_`` prefix), ``wall_s`` and ``params``."""
    t0 = time.perf_counter()
    cfg = with_params(job.cfg, job.kind, job.params)
    summary = train_model(cfg, job.dataset, job.protocol, job.kind, epochs=job.epochs, budget_s=job.budget_s,
                          embeddings=job.embeddings, users=job.users)
    line = summary.get("val_metrics") or {}
    summary["val_last"] = {k[4:]: v for k, v in line.items() if k.startswith("val_")}
    summary["wall_s"] = time.perf_counter() - t0
    summary["params"] = dict(job.params)
    if not job.keep:
        shutil.rmtree(summary["run_dir"], ignore_errors=True)
        summary["run_dir"] = None
    return summary


def trial_controls(epochs: int, schedule_epochs: int, seed: int, val_users: int) -> dict[str, Any]:
    """Run controls of a search trial: one validation round, after the last epoch, on the step schedule of
    the final runs."""
    if epochs > schedule_epochs:
        raise ValueError(f"a trial of {epochs} epochs does not fit the {schedule_epochs}-epoch schedule")
    return {"train.seed": seed, "train.val_every": epochs, "train.patience": 1 << 30,
            "train.schedule_epochs": schedule_epochs, "train.val_users": val_users, "train.fit_splits": "train"}


def final_controls(schedule_epochs: int, seed: int, val_users: int, patience: int) -> dict[str, Any]:
    """Run controls of a final run: validation every epoch, early stopping after ``patience`` rounds
    without improvement, the same step schedule as the search."""
    return {"train.seed": seed, "train.val_every": 1, "train.patience": patience,
            "train.schedule_epochs": schedule_epochs, "train.val_users": val_users, "train.fit_splits": "train"}


def refit_controls(schedule_epochs: int, seed: int) -> dict[str, Any]:
    """Run controls of a refit on train + valid (for the epochs validation chose, no validation)."""
    return {"train.seed": seed, "train.schedule_epochs": schedule_epochs, "train.fit_splits": "train_valid"}


@dataclass(frozen=True)
class EvalJob:
    """One evaluation: a trained run (``run_dir``) or a baseline at ``stage``, with per-case ranks kept."""

    cfg: Settings
    dataset: str
    protocol: str
    model: str
    run_dir: str | None = None
    stage: str = S.TEST
    model_overrides: dict[str, Any] | None = None
    embeddings: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def run_eval(job: EvalJob) -> dict[str, Any]:
    """:func:`evaluate_run` of ``job`` (no report written), per-case ranks and slices included."""
    return evaluate_run(job.cfg, job.dataset, job.protocol, job.model, run_dir=job.run_dir, stage=job.stage,
                        embeddings=job.embeddings, write_report=False, keep_cases=True,
                        model_overrides=job.model_overrides)


# ==================================================================================================
# One setting from a grid
# ==================================================================================================
def choose_value(values: Sequence[Any], score: Callable[[Any], dict[str, float]], key: str,
                 admissible: Callable[[dict[str, float]], bool] | None = None,
                 fallback_key: str | None = None) -> dict[str, Any]:
    """The value with the best ``score(value)[key]`` among the admissible ones (ties: the earlier value).

    When no value is admissible, the best by ``fallback_key`` (default ``key``) is chosen and
    ``constraint_met`` is False. Returns ``{"table": [{"value", **scores, "admissible"}], "chosen",
    "key", "constraint_met"}``.
    """
    if not values:
        raise ValueError("choose_value needs at least one value")
    table = []
    for v in values:
        row = {"value": v, **score(v)}
        row["admissible"] = True if admissible is None else bool(admissible(row))
        table.append(row)

    def best(rows: list[int], k: str) -> dict[str, Any]:
        def val(i: int) -> float:
            v = table[i].get(k)
            return v if v is not None and math.isfinite(v) else -math.inf
        return table[max(rows, key=lambda i: (val(i), -i))]

    ok = [i for i, r in enumerate(table) if r["admissible"]]
    pick = best(ok, key) if ok else best(list(range(len(table))), fallback_key or key)
    return {"table": table, "chosen": pick["value"], "key": key, "constraint_met": bool(ok)}

