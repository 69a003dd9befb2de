"""The stages between a validated batch and a candidate model: features, encoding, training, evaluation
and monitoring. Each is one call into its stage's package, recorded under the run's key.

3. ``refresh_user_features`` (Feast) and ``encode_new_items`` (CEG, one mapped task per shard) in parallel.
4. ``train_pch``: a full run trains from scratch (every kind of ``pipeline.challengers`` too, the best on
   validation becoming the candidate); an incremental run warm-starts from the promoted model with a
   small budget.
5. ``evaluate``: the candidate on the test split (slices: cold-start, long-tail, head, cold users) and
   on the validation split, where the promotion gate (:mod:`learn_tasks.orchestration.gate`) compares
   it with the promoted model.
8. ``monitor``: Evidently drift and slice reports (:mod:`learn_tasks.monitoring`).
"""
from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from learn_tasks import schema as S
from learn_tasks.ceg import encode, store
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.data.splits import load_split
from learn_tasks.evaluation import gate_sample, harness
from learn_tasks.monitoring import monitor, rules
from learn_tasks.online import updates
from learn_tasks.orchestration.runs import (FULL, INCREMENTAL, PipelineError, RunArgs, data_fingerprint, record,
                                            recorded, why_again)
from learn_tasks.pch import kinds as pch_kinds
from learn_tasks.pch import registry
from learn_tasks.training import train

log = logging.getLogger("learn.pipeline")


def refresh_user_features(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Feast: rebuild the feature tables from the published data, apply, materialise (idempotent); then the
    events logged after the landing go back on top of the users' online rows (``updates.replay_tail``).
    An incremental run writes online only the rows the increment changed (same values as writing all)."""
    res = updates.refresh_features(cfg, a.dataset, incremental=a.mode == INCREMENTAL)
    return record(cfg, a, "features", res)


def plan_encode_shards(cfg: Settings, a: RunArgs) -> list[list[int]]:
    """Shards ``[[i, n], ...]`` for the mapped encode tasks: one per ``encode.shard_items`` items, at most
    ``pipeline.encode_shards`` (parallel workers beyond the cores only add model loads). An incremental
    run counts the items it published (added or changed): the rest have their embedding already, and
    each shard loads the encoder and hashes its part of the catalogue whatever it has to encode."""
    published = (recorded(cfg, a, "validate") or {}).get("published") or {}
    if a.mode == INCREMENTAL and "items_added" in published:
        n_items = int(published.get("items_added") or 0) + int(published.get("items_updated") or 0)
    else:
        n_items = len(data.load_items(cfg, a.dataset))
    n = max(1, min(cfg.pipeline.encode_shards, math.ceil(n_items / max(cfg.encode.shard_items, 1))))
    return [[i, n] for i in range(n)]


def encode_new_items(cfg: Settings, a: RunArgs, shard: Sequence[int]) -> dict[str, Any]:
    """CEG for one shard: only items without an up-to-date embedding are encoded."""
    i, n = int(shard[0]), int(shard[1])
    res = encode.encode_catalogue(cfg, a.dataset, shard=(i, n))
    small = {k: res.get(k) for k in ("encoded", "skipped", "quarantined", "total", "fingerprint", "store",
                                     "complete", "shard", "seconds")}
    return record(cfg, a, f"encode_{i}_of_{n}", small)


def _train_inputs(cfg: Settings, a: RunArgs, kinds: Sequence[str]) -> dict[str, Any]:
    """What a training run of ``kinds`` (:func:`candidate_kinds`) depends on."""
    pipeline = cfg.pipeline.model_dump()
    if not pipeline["challengers"]:  # without challengers, records written before the setting existed stay valid
        pipeline.pop("challengers")
    return {"data": data_fingerprint(cfg, a.dataset), "embeddings": store.current_fingerprint(cfg, a.dataset),
            "mode": a.mode, "epochs": a.epochs, "budget_s": a.budget_s, "model": kinds[0] if len(kinds) == 1 else kinds,
            "settings": {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "pipeline": pipeline}}


def candidate_kinds(cfg: Settings, a: RunArgs) -> list[str]:
    """The kinds this run trains: a full run ``pipeline.model`` and ``pipeline.challengers`` (only the run's own
    ``model`` when it names one); an incremental run one kind, the promoted model's when it is among them."""
    allowed = list(dict.fromkeys([a.kind(cfg), *([] if a.model else cfg.pipeline.challengers)]))
    if a.mode == FULL:
        if len(allowed) > 1:
            _check_comparable(cfg, allowed)
        return allowed
    promoted = registry.promoted(cfg, a.dataset)
    kind = registry.run_kind(promoted) if promoted is not None else None
    return [kind if kind in allowed else a.kind(cfg)]


def _check_comparable(cfg: Settings, kinds: Sequence[str]) -> None:
    """Kinds chosen between on validation must be scored alike: the same early-stopping metric on the same
    validation users (each kind's settings resolved as training resolves them), and a validation split."""
    terms = {k: (r.train.early_stop_metric, r.train.val_users, r.train.fit_splits)
             for k, r in ((k, pch_kinds.resolve(cfg, k)) for k in kinds)}
    if len(set(terms.values())) > 1 or any(fit != "train" for _, _, fit in terms.values()):
        raise PipelineError("pipeline.challengers: every kind must validate alike (train.early_stop_metric, "
                            f"train.val_users, train.fit_splits = train); resolved per kind: {terms}")


def train_pch(cfg: Settings, a: RunArgs, encoded: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Train the candidate (full: from scratch; incremental: warm start from the promoted model). With
    ``pipeline.challengers`` a full run trains every kind and the best on validation is the candidate."""
    kinds = candidate_kinds(cfg, a)
    inputs = _train_inputs(cfg, a, kinds)
    done = recorded(cfg, a, "train", inputs)
    if done and Path(done["run_dir"]).exists():
        # Same interval, same inputs: the model is already trained (recorded again so the summary says so).
        return record(cfg, a, "train", {**done, "reused": True, "trained_because": None}, inputs)
    why = why_again(cfg, a, "train", inputs)
    if store.current_fingerprint(cfg, a.dataset) is None and any(k != "sasrec" for k in kinds):
        raise PipelineError(f"no complete embedding version for {a.dataset}: the encode tasks did not finish")
    if len(kinds) == 1:
        small = _train_kind(cfg, a, kinds[0], encoded)
        small["trained_because"] = why
        return record(cfg, a, "train", small, inputs)
    runs = []
    for kind in kinds:  # each kind recorded on its own: a retry after one kind failed keeps the others
        k_inputs = {**inputs, "model": kind}
        k_done = recorded(cfg, a, f"train_{kind}", k_inputs)
        if k_done and Path(k_done["run_dir"]).exists():
            runs.append({**k_done, "reused": True})
        else:
            runs.append(record(cfg, a, f"train_{kind}", _train_kind(cfg, a, kind, encoded), k_inputs))
    metric = pch_kinds.resolve(cfg, kinds[0]).train.early_stop_metric  # the same for every kind (checked)
    value = lambda r: (r.get("val") or {}).get(metric)  # noqa: E731
    scored = [r for r in runs if value(r) is not None]
    if not scored:
        raise PipelineError(f"none of the kinds {kinds} has a validation {metric}: cannot choose a candidate")
    best = max(scored, key=value)  # ties: the first listed, pipeline.model before the challengers
    small = {**best, "reused": False, "trained_because": why,
             "choice": {"metric": metric, "chosen": best["kind"],
                        "kinds": [{"kind": r["kind"], "run_dir": r["run_dir"], "val": value(r), "reused": r["reused"],
                                   "best_epoch": r.get("best_epoch"), "stopped": r.get("stopped")} for r in runs]}}
    log.info("candidate kind %s: validation %s %s", best["kind"], metric,
             ", ".join(f"{r['kind']} {value(r)}" for r in runs))
    return record(cfg, a, "train", small, inputs)


def _train_kind(cfg: Settings, a: RunArgs, kind: str, encoded: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """One kind's training run of this pipeline run (its record's fields)."""
    p = cfg.pipeline
    warm = registry.promoted(cfg, a.dataset) if a.mode == INCREMENTAL else None
    if warm is not None and registry.run_kind(warm) != kind:
        # Another kind serves (pipeline.model was changed): its weights cannot seed this architecture,
        # so this increment trains the new kind from scratch, with the full run's limits.
        log.warning("promoted model %s is a %r, the candidate a %r: training from scratch", warm.name,
                    registry.run_kind(warm), kind)
        warm = None
    users, update = None, "dense"
    if a.mode == INCREMENTAL and warm is not None:
        epochs = a.epochs if a.epochs is not None else p.incremental_epochs
        budget = a.budget_s if a.budget_s is not None else p.incremental_budget_s
        update = p.incremental_update
        # A sparse update trains only rows of items with new evidence: the users who gave it are enough.
        users = fine_tune_users(cfg, a, window_only=update == "sparse")
    else:
        epochs = a.epochs if a.epochs is not None else p.epochs
        budget = a.budget_s if a.budget_s is not None else p.budget_s
    # A warm start is scored by the promotion gate on its fixed sample (evaluate): no validation round here.
    res = train.train_model(cfg, a.dataset, protocol=p.protocol, model=kind, epochs=epochs, budget_s=budget,
                            warm_start=warm, users=users, update=update, validate_run=warm is None)
    keep = ("run_dir", "run_id", "dataset", "protocol", "kind", "stopped", "epochs_run", "best_epoch", "steps",
            "val", "train_seconds", "train_sequences", "items", "embedding_fingerprint", "peak_rss_mb", "update",
            "sparse_rows")
    small = {k: res.get(k) for k in keep}
    small.update({"warm_start": str(warm) if warm else None, "epochs_limit": epochs, "budget_s": budget,
                  "encoded": _encode_totals(encoded), "reused": False,
                  "fine_tune_users": None if users is None else len(users)})
    return small


def fine_tune_users(cfg: Settings, a: RunArgs, window_only: bool = False) -> np.ndarray | None:
    """Users an incremental warm start trains on: those with events in the run's window (what is new) and
    ``pipeline.incremental_replay_users`` others drawn at random, so a dense fine-tune does not drift
    towards the day's users; None (every user) when replay is None or covers everyone. ``window_only``:
    the window's users alone (a sparse update, whose frozen dense weights cannot drift)."""
    replay = cfg.pipeline.incremental_replay_users
    if replay is None and not window_only:
        return None
    inter = data.load_interactions(cfg, a.dataset)
    ts = inter[S.EVENT_TIMESTAMP]
    new = np.unique(inter.loc[(ts >= a.accept_from) & (ts < a.end), S.USER_ID].to_numpy(np.int64))
    if window_only:
        return new
    others = np.setdiff1d(np.unique(inter[S.USER_ID].to_numpy(np.int64)), new)
    if len(others) <= replay:
        return None
    rng = np.random.default_rng([cfg.train.seed, zlib.crc32(a.key.encode())])  # another replay set each day
    return np.union1d(new, rng.choice(others, size=replay, replace=False))


def _encode_totals(encoded: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    if encoded is None:
        return None
    rows = [encoded[i] for i in range(len(encoded))]  # index access: a mapped XCom list is lazy
    return {"shards": len(rows), **{k: int(sum(r.get(k) or 0 for r in rows))
                                    for k in ("encoded", "skipped", "quarantined", "total")}}


def eval_settings(cfg: Settings, users: int) -> Settings:
    return cfg.with_overrides(evaluate={"max_users": int(users)})


def _table(metrics: Mapping[str, Any], ks: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The evaluation table: slice -> cases + recall/ndcg at each k + mrr (small enough for XCom)."""
    out = {}
    for name in S.SLICES:
        m = metrics.get(name)
        if not m:
            continue
        row = {"cases": m.get("cases")}
        for k in ks:
            for metric in ("recall", "ndcg"):
                if f"{metric}@{k}" in m:
                    row[f"{metric}@{k}"] = m[f"{metric}@{k}"]
        if "mrr" in m:
            row["mrr"] = m["mrr"]
        out[name] = row
    return out


def evaluate_candidate(cfg: Settings, a: RunArgs, trained: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate on the test split (report table with slices) and on the gate's fixed validation
    sample (:mod:`learn_tasks.evaluation.gate_sample`; a full run draws a new one)."""
    p = cfg.pipeline
    # A daily incremental run reports on a user sample: scoring every user every day costs more than
    # the rest of the increment, and the gate has its own fixed sample.
    users = p.eval_users if a.mode == FULL else p.incremental_eval_users
    sample = gate_sample.ensure_sample(cfg, a.dataset, p.protocol, p.gate_users, cfg.train.seed,
                                       redraw_for=a.key if a.mode == FULL else None)
    inputs = {"run_dir": trained["run_dir"], "data": data_fingerprint(cfg, a.dataset),
              "eval_users": users, "gate_users": p.gate_users, "gate_sample": sample.digest,
              "evaluate": cfg.evaluate.model_dump()}
    done = recorded(cfg, a, "evaluate", inputs)
    if done:
        return done
    kind = trained.get("kind") or a.kind(cfg)  # a full run with challengers chose it on validation
    # One scorer for both: the checkpoint, its catalogue and the item vectors are loaded and computed once.
    scorer = harness.make_scorer(cfg, a.dataset, p.protocol, kind, load_split(cfg, a.dataset, p.protocol),
                                 Path(trained["run_dir"]))
    test = harness.evaluate_run(eval_settings(cfg, users), a.dataset, p.protocol, model=kind,
                                run_dir=trained["run_dir"], stage=S.TEST, scorer=scorer)
    valid = gate_sample.score(cfg, a.dataset, p.protocol, kind, trained["run_dir"], sample, scorer=scorer)
    res = {"run_dir": trained["run_dir"], "protocol": p.protocol,
           "test": {"users": test["meta"]["users"], "table": _table(test, cfg.evaluate.ks),
                    "coverage": test.get("coverage"), "report": test["meta"].get("report")},
           "valid": {"users": valid["users"], p.gate_metric: gate_metric_of({S.SLICE_ALL: valid}, p.gate_metric),
                     "sample": sample.digest, "report": None}}
    return record(cfg, a, "evaluate", res, inputs)


def gate_metric_of(result: Mapping[str, Any], name: str) -> float | None:
    value = (result.get(S.SLICE_ALL) or {}).get(name)
    return None if value is None else float(value)


def run_monitor(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """Evidently drift and slice monitoring of this run (``learn_tasks.monitoring.monitor.monitor_window``)."""
    # The run key names the monitoring run, so re-running an interval replaces its reports; an
    # incremental run compares its own new events, a full run the temporal split's newest window.
    start, end = (None, None) if a.mode == FULL else (a.accept_from.isoformat(), a.end.isoformat())
    res = monitor.monitor_window(cfg, a.dataset, current_start=start, current_end=end, run_id=a.key,
                                 run_date=a.start.strftime("%Y-%m-%d"))
    alerts = res.get("alerts") or []
    small = {"report": res.get("report"), "summary": res.get("summary"), "alerts": alerts[:20],
             "alert_count": len(alerts), "workspace": res.get("workspace")}
    record(cfg, a, "monitor", small)
    if alerts and cfg.pipeline.fail_on_alert:
        lines = "; ".join(f"{x.get('slice')}/{x.get('metric')} = {x.get('value')} (threshold {x.get('threshold')})"
                          for x in alerts[:5])
        raise PipelineError(f"monitoring raised {len(alerts)} alert(s): {lines}. Report: {res.get('report')}")
    return small


def monitor_dag_window(cfg: Settings, a: RunArgs, params: Mapping[str, Any] | None = None,
                       run_id: str | None = None) -> dict[str, Any]:
    """``learn_monitoring``: Evidently reports for the temporal split's test window (``window=split``) or
    this run's data interval (``window=interval``, live logs); alerts fail the task when ``fail_on_alert``."""
    params = dict(params or {})
    start, end = (a.start.isoformat(), a.end.isoformat()) if params.get("window") == "interval" else (None, None)
    result = monitor.monitor_window(cfg, a.dataset, start, end, run_id=f"learn_monitoring__{run_id or a.key}",
                                    run_date=a.start.strftime("%Y-%m-%d"))
    if result["alerts"] and params.get("fail_on_alert", True):
        raise PipelineError(str(rules.MonitoringAlert(result["alerts"], result["report"])))
    return {"report": result["report"], "alerts": result["alerts"], "notes": result["notes"]}
