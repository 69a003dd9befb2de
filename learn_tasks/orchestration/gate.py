"""The promotion gate (stage 6): serve the candidate, or keep the current model, and say why.

The candidate is promoted unless it is worse than the promoted model by more than
``pipeline.promotion_margin`` (relative) on ``pipeline.gate_metric`` over the gate's fixed validation
sample (:mod:`learn_tasks.evaluation.gate_sample`), or worse on one of ``pipeline.gate_slices`` (by default
the cold-start and long-tail targets the product exists for): there, where slices hold few cases, the
rule is the paired bootstrap interval of the difference, which must lie wholly below minus the margin to
keep the candidate out (:func:`slice_conditions`). Both are scored by the same code on the same cases;
each model is scored as the kind it is, and a score cached for the same model and sample is reused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.evaluation import gate_sample, uncertainty
from learn_tasks.orchestration.runs import PIPELINE_DAG, PipelineError, RunArgs, record, recorded
from learn_tasks.orchestration.stages import gate_metric_of
from learn_tasks.pch import registry

log = logging.getLogger("learn.pipeline")


def decide(candidate: float | None, current: float | None, margin: float) -> tuple[bool, str]:
    """The gate rule: promote unless the candidate is worse than the current model by more than ``margin``
    (relative). No current model, or one that cannot be scored, means promote."""
    if current is None:
        return True, "no promoted model to compare with"
    if candidate is None:
        return False, "the candidate has no validation score"
    floor = current * (1.0 - margin)
    if candidate >= floor:
        return True, f"candidate {candidate:.4f} >= current {current:.4f} x (1 - {margin:g}) = {floor:.4f}"
    return False, (f"candidate {candidate:.4f} is worse than current {current:.4f} by more than the "
                   f"{margin:.0%} margin (floor {floor:.4f}): keeping the current model")


def slice_conditions(candidate_ranks: Sequence[int], current_ranks: Sequence[int], masks: Mapping[str, np.ndarray],
                     slices: Sequence[str], metric: str, margin: float, min_cases: int,
                     n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per-slice gate conditions on paired per-case ranks (same cases, same order).

    One row per slice: its ``cases``, both models' ``metric`` (``candidate``, ``current``), the ``floor``
    (current x (1 - margin)), the paired bootstrap 95% interval of candidate minus current (``difference``:
    mean, lo, hi) and ``status``: ``failed`` when the whole interval lies below ``floor - current`` (worse
    beyond the margin, and not by chance), else ``passed``; ``skipped`` (never enforced) with fewer than
    ``min_cases`` cases.
    """
    cand = uncertainty.case_values(np.asarray(candidate_ranks), metric)
    cur = uncertainty.case_values(np.asarray(current_ranks), metric)
    if len(cand) != len(cur):
        raise ValueError(f"paired ranks of different lengths ({len(cand)} vs {len(cur)})")
    out: dict[str, dict[str, Any]] = {}
    for name in slices:
        m = np.asarray(masks[name], bool)
        n = int(m.sum())
        if n == 0 or n < min_cases:
            out[name] = {"cases": n, "status": "skipped", "why": f"{n} case(s) < pipeline.gate_min_cases {min_cases}"}
            continue
        c, k = float(cand[m].mean()), float(cur[m].mean())
        diff = uncertainty.paired_difference(cand[m], cur[m], n_boot=n_boot, seed=seed)
        floor = k * (1.0 - margin)
        out[name] = {"cases": n, "candidate": c, "current": k, "floor": floor,
                     "difference": {key: round(v, 6) for key, v in diff.items()},
                     "status": "failed" if diff["hi"] < floor - k else "passed"}
    return out


def slice_reason(rows: Mapping[str, Mapping[str, Any]], metric: str) -> str | None:
    """Why the slice conditions keep the candidate out, or None when none does."""
    bad = {name: r for name, r in rows.items() if r["status"] == "failed"}
    if not bad:
        return None
    parts = [f"{name} {metric} {r['candidate']:.4f} vs {r['current']:.4f} (difference {r['difference']['mean']:+.4f}, "
             f"95% interval [{r['difference']['lo']:+.4f}, {r['difference']['hi']:+.4f}] below "
             f"{r['floor'] - r['current']:+.4f}, {r['cases']} cases)" for name, r in bad.items()]
    return "the candidate is worse on " + "; ".join(parts) + ": keeping the current model"


def promotion_gate(cfg: Settings, a: RunArgs, trained: Mapping[str, Any], evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """Promote the candidate or keep serving the current model, with the reason either way."""
    p = cfg.pipeline
    cand_dir = Path(trained["run_dir"])
    current = registry.promoted(cfg, a.dataset)
    # The rule's settings are inputs: a re-run after changing them decides again.
    inputs = {k: getattr(p, k) for k in ("gate_metric", "promotion_margin", "gate_slices", "gate_min_cases",
                                         "gate_n_boot")}
    inputs["sample"] = evaluated["valid"].get("sample")
    done = recorded(cfg, a, "gate", inputs)
    if done and done.get("candidate") == str(cand_dir) and current is not None \
            and str(current) == done.get("serving"):
        return done  # decided before for this interval and nothing moved since
    cand_score = evaluated["valid"].get(p.gate_metric)
    cur_score, cur_cached = None, False
    if current is not None and current.resolve() != cand_dir.resolve():
        sample = gate_sample.load_sample(cfg, a.dataset)
        if sample is None or sample.digest != evaluated["valid"].get("sample"):
            raise PipelineError(f"the gate sample changed since the candidate was evaluated "
                                f"({evaluated['valid'].get('sample')} -> {sample.digest if sample else None}): "
                                f"clear evaluate to score the candidate again")
        try:
            # The promoted model is scored as the kind it is: another kind may serve (pipeline.model changed).
            # Same fixed sample as the candidate; a score cached for the same model, sample and embedding
            # version (it was scored as the candidate of the run that promoted it) is reused.
            cur_kind = registry.run_kind(current) or a.kind(cfg)
            cur = gate_sample.score(cfg, a.dataset, p.protocol, cur_kind, current, sample)
            cur_score = gate_metric_of({S.SLICE_ALL: cur}, p.gate_metric)
            cur_cached = bool(cur.get("cached"))
        except Exception as exc:  # noqa: BLE001 - a current model that cannot be scored is replaced, loudly
            log.warning("cannot score the promoted model %s: %s", current, exc)
    promote, reason = decide(cand_score, cur_score, p.promotion_margin)
    slices: dict[str, dict[str, Any]] = {}
    slice_error = None
    if promote and cur_score is not None and p.gate_slices:
        try:
            # The candidate's ranks were cached when evaluate scored it: this reads them back.
            cand = gate_sample.score(cfg, a.dataset, p.protocol, registry.run_kind(cand_dir) or a.kind(cfg),
                                     cand_dir, sample)
            if cand.get("sample", sample.digest) != sample.digest or cand.get("ranks") is None \
                    or cur.get("ranks") is None:
                raise ValueError("the scores on the gate sample carry no per-case ranks of this sample")
            slices = slice_conditions(cand["ranks"], cur["ranks"],
                                      gate_sample.slice_masks(sample, cfg.evaluate.cold_user_max_events),
                                      p.gate_slices, p.gate_metric, p.promotion_margin, p.gate_min_cases,
                                      p.gate_n_boot, cfg.train.seed)
        except Exception as exc:  # noqa: BLE001 - the overall rule stands; the record and the log say why
            slice_error = f"{type(exc).__name__}: {exc}"
            log.warning("promotion gate: slice conditions not checked (%s)", slice_error)
        why = slice_reason(slices, p.gate_metric)
        if why:
            promote, reason = False, why
    if current is not None and current.resolve() == cand_dir.resolve():
        promote, reason = True, "the candidate is already the promoted model"
    elif promote:
        registry.promote(cfg, a.dataset, cand_dir, reason=f"{PIPELINE_DAG} {a.key}: {reason}")
    serving = registry.promoted(cfg, a.dataset)
    res = {"promoted": promote, "reason": reason, "metric": p.gate_metric, "margin": p.promotion_margin,
           "candidate": str(cand_dir), "candidate_score": cand_score,
           "previous": str(current) if current else None, "previous_score": cur_score,
           "previous_score_cached": cur_cached, "sample": evaluated["valid"].get("sample"), "slices": slices,
           "slices_error": slice_error,
           "serving": str(serving) if serving else None}
    log.info("promotion gate: %s (%s)", "promote" if promote else "keep current", reason)
    return record(cfg, a, "gate", res, inputs)
