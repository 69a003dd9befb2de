"""The promotion gate (stage 6): serve the candidate, or keep the current model, and say why.

The candidate and the promoted model are scored by the same code on the same validation users, each as
the kind it is. The gate checks slice ``all`` (margin ``pipeline.promotion_margin``) and every slice of
``pipeline.gate_slices`` (e.g. ``cold_start`` and ``long_tail``, each with its own margin) on
``pipeline.gate_metric``. The candidate fails a slice when it is worse than the current model by more than
that slice's margin (relative) **and**, with ``pipeline.gate_bootstrap`` replicates, the paired bootstrap
95% interval of the difference excludes zero: a difference within noise is a tie, and a tie never blocks.
A slice with fewer than ``pipeline.gate_min_cases`` validation cases is reported but not gated. The
candidate is promoted when it fails no slice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.evaluation import harness, uncertainty
from learn_tasks.orchestration.runs import PIPELINE_DAG, RunArgs, record, recorded
from learn_tasks.orchestration.stages import eval_settings, gate_metric_of
from learn_tasks.pch import registry

log = logging.getLogger("learn.pipeline")


def decide(candidate: float | None, current: float | None, margin: float) -> tuple[bool, str]:
    """The point rule of one slice: promote unless the candidate is worse than the current model by more
    than ``margin`` (relative). No current model, or one that cannot be scored, means promote."""
    if current is None:
        return True, "no promoted model to compare with"
    if candidate is None:
        return False, "the candidate has no validation score"
    floor = current * (1.0 - margin)
    if candidate >= floor:
        return True, f"candidate {candidate:.4f} >= current {current:.4f} x (1 - {margin:g}) = {floor:.4f}"
    return False, (f"candidate {candidate:.4f} is worse than current {current:.4f} by more than the "
                   f"{margin:.0%} margin (floor {floor:.4f}): keeping the current model")


def slice_margins(cfg: Settings) -> dict[str, float]:
    """Every gated slice and its relative margin: ``all`` first."""
    p = cfg.pipeline
    unknown = set(p.gate_slices) - set(S.SLICES)
    if unknown:
        raise ValueError(f"pipeline.gate_slices: unknown slice(s) {sorted(unknown)}; slices are {S.SLICES}")
    return {S.SLICE_ALL: p.promotion_margin, **{s: m for s, m in p.gate_slices.items() if s != S.SLICE_ALL}}


def decide_slices(candidate: Mapping[str, Any], current: Mapping[str, Any], margins: Mapping[str, float],
                  metric: str, min_cases: int = 0, n_boot: int = 0, seed: int = 0) -> tuple[bool, str, dict]:
    """The per-slice rule on two evaluations of the same validation cases.

    ``candidate`` / ``current``: :func:`learn_tasks.evaluation.harness.evaluate_run` results made with
    ``keep_cases=True`` (``per_case`` ranks and slice masks, same users in the same order). Returns
    ``(promote, reason, table)`` with one row per slice: both scores, the cases, the paired difference and
    its interval (with ``n_boot`` > 0), the floor and whether the slice passed, failed or was skipped.
    """
    a, b = candidate["per_case"], current["per_case"]
    if not np.array_equal(a["user_ids"], b["user_ids"]):
        raise ValueError("the candidate and the current model were not scored on the same validation users")
    table: dict[str, dict[str, Any]] = {}
    failed = []
    for name, margin in margins.items():
        mask = a["slices"].get(name)
        cases = int(mask.sum()) if mask is not None else 0
        row: dict[str, Any] = {"cases": cases, "margin": margin}
        if cases == 0 or cases < min_cases:
            table[name] = {**row, "status": "skipped", "why": f"{cases} validation case(s) < {max(min_cases, 1)}"}
            continue
        va = uncertainty.case_values(a["ranks"][mask], metric)
        vb = uncertainty.case_values(b["ranks"][mask], metric)
        cand, cur = float(va.mean()), float(vb.mean())
        floor = cur * (1.0 - margin)
        row.update(candidate=cand, current=cur, floor=floor)
        worse = cand < floor
        if n_boot:
            diff = uncertainty.paired_difference(va, vb, n_boot=n_boot, seed=seed)
            row["difference"] = diff
            worse = worse and diff["hi"] < 0  # a difference within noise is a tie
        row["status"] = "failed" if worse else "passed"
        table[name] = row
        if worse:
            failed.append(name)
    if failed:
        parts = [f"{s} {table[s]['candidate']:.4f} < floor {table[s]['floor']:.4f} (current {table[s]['current']:.4f}, "
                 f"margin {table[s]['margin']:.0%})" for s in failed]
        return False, f"candidate loses on {metric}: " + "; ".join(parts) + ": keeping the current model", table
    checked = [s for s, r in table.items() if r["status"] == "passed"]
    return True, (f"candidate within the margins on {metric} in every gated slice ({', '.join(checked)})"
                  + ("; differences inside the 95% interval count as ties" if n_boot else "")), table


def promotion_gate(cfg: Settings, a: RunArgs, trained: Mapping[str, Any], evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """Promote the candidate or keep serving the current model, with the reason either way."""
    p = cfg.pipeline
    cand_dir = Path(trained["run_dir"])
    current = registry.promoted(cfg, a.dataset)
    done = recorded(cfg, a, "gate")
    if done and done.get("candidate") == str(cand_dir) and current is not None \
            and str(current) == done.get("serving"):
        return done  # decided before for this interval and nothing moved since
    cand_score = evaluated["valid"].get(p.gate_metric)
    cur_score, table = None, None
    promote, reason = decide(cand_score, None, p.promotion_margin)
    if current is not None and current.resolve() != cand_dir.resolve():
        ecfg = eval_settings(cfg, p.gate_users)
        try:
            # The promoted model is scored as the kind it is: another kind may serve (pipeline.model changed).
            cur_kind = registry.run_kind(current) or a.kind(cfg)
            cur = harness.evaluate_run(ecfg, a.dataset, p.protocol, model=cur_kind, run_dir=current, stage=S.VALID,
                                       write_report=False, keep_cases=True)
            cur_score = gate_metric_of(cur, p.gate_metric)
        except Exception as exc:  # noqa: BLE001 - a current model that cannot be scored is replaced, loudly
            log.warning("cannot score the promoted model %s: %s", current, exc)
            cur = None
        if cur is not None:
            cand = harness.evaluate_run(ecfg, a.dataset, p.protocol, model=a.kind(cfg), run_dir=cand_dir,
                                        stage=S.VALID, write_report=False, keep_cases=True)
            cand_score = gate_metric_of(cand, p.gate_metric)
            promote, reason, table = decide_slices(cand, cur, slice_margins(cfg), p.gate_metric, p.gate_min_cases,
                                                   p.gate_bootstrap, cfg.evaluate.seed)
    if current is not None and current.resolve() == cand_dir.resolve():
        promote, reason = True, "the candidate is already the promoted model"
    elif promote:
        registry.promote(cfg, a.dataset, cand_dir, reason=f"{PIPELINE_DAG} {a.key}: {reason}")
    serving = registry.promoted(cfg, a.dataset)
    res = {"promoted": promote, "reason": reason, "metric": p.gate_metric, "margin": p.promotion_margin,
           "candidate": str(cand_dir), "candidate_score": cand_score,
           "previous": str(current) if current else None, "previous_score": cur_score,
           "serving": str(serving) if serving else None, "slices": table}
    log.info("promotion gate: %s (%s)", "promote" if promote else "keep current", reason)
    return record(cfg, a, "gate", res)
