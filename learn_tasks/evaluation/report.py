"""Evaluation outputs: ``metrics.json`` beside a test-stage run, and ``metrics.json``, ``report.md`` and an SVG
plot of Recall@K by target popularity under ``reports/eval/<dataset>/<run or baseline>-<stage>/``; under a
URL home both folders are published (:mod:`learn_tasks.artifacts`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from learn_tasks import artifacts
from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.pch import registry
from learn_tasks.storage import atomic_dir, write_json


def write_outputs(cfg: Settings, result: dict[str, Any], scorer) -> Path:
    """Write the outputs of one evaluation; ``scorer`` is the harness's Scorer (its ``run_dir`` is used)."""
    meta = result["meta"]
    name = (f"{scorer.run_dir.name}-{meta['stage']}" if scorer.run_dir is not None
            else f"{meta['model']}-{meta['protocol']}-{meta['stage']}")
    out = cfg.paths.eval_reports(meta["dataset"]) / name
    if scorer.run_dir is not None and meta["stage"] == S.TEST:
        write_json(result, scorer.run_dir / "metrics.json")
        registry.publish_run(cfg, scorer.run_dir)  # a URL home: the run's published copy gets it too
    with atomic_dir(out) as tmp:
        write_json(result, tmp / "metrics.json")
        (tmp / "recall_by_popularity.svg").write_text(popularity_svg(result), encoding="utf-8")
        (tmp / "report.md").write_text(markdown_report(result), encoding="utf-8")
    artifacts.publish(cfg, out)
    return out


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.4f}" if isinstance(x, float) else str(x))


def markdown_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    ks = meta["ks"]
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr", "cases"]
    lines = [f"# Evaluation: {meta['model']} on {meta['dataset']} ({meta['protocol']}, {meta['stage']})", "",
             f"Full ranking over {meta['items']} items, {meta['users']} users "
             f"(of {meta['users_available']}); history items excluded. Run: `{meta['run_dir']}`.", "",
             "| slice | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in S.SLICES:
        if s in result:
            lines.append(f"| {s} | " + " | ".join(_fmt(result[s].get(c)) for c in cols) + " |")
    lines += ["", "| K | coverage | cold-start share | long-tail share |", "|---|---|---|---|"]
    cov = result["coverage"]
    for k in ks:
        lines.append(f"| {k} | {_fmt(cov[f'coverage@{k}'])} | {_fmt(cov[f'cold_start_share@{k}'])} | "
                     f"{_fmt(cov[f'long_tail_share@{k}'])} |")
    if "future" in result:
        lines += ["", "Recall@K against every item after the cut-off: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in result["future"].items())]
    lines += ["", "## Recall@K by training popularity of the target", "",
              "![Recall@K by popularity bucket](recall_by_popularity.svg)", "",
              "| popularity | cases | " + " | ".join(f"recall@{k}" for k in ks) + " |", "|---" * (len(ks) + 2) + "|"]
    for b in result["popularity_buckets"]:
        lines.append(f"| {b['bucket']} | {b['cases']} | " + " | ".join(_fmt(b[f'recall@{k}']) for k in ks) + " |")
    return "\n".join(lines) + "\n"


def popularity_svg(result: dict[str, Any], width: int = 640, height: int = 360) -> str:
    """A grouped bar chart of Recall@K per popularity bucket, as a self-contained SVG."""
    ks = result["meta"]["ks"]
    buckets = result["popularity_buckets"]
    colours = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee"]
    left, bottom, top, right = 50, 50, 30, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    vals = [b[f"recall@{k}"] or 0.0 for b in buckets for k in ks]
    ymax = max(max(vals, default=0.0), 1e-9)
    ymax = math.ceil(ymax * 10) / 10 if ymax > 0.1 else ymax * 1.1
    group_w = plot_w / max(len(buckets), 1)
    bar_w = group_w * 0.8 / len(ks)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">Recall@K by training popularity of the target '
             f'({result["meta"]["model"]}, {result["meta"]["protocol"]})</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>']
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{ymax * i / 4:.3f}</text>')
    for g, b in enumerate(buckets):
        x0 = left + g * group_w + group_w * 0.1
        for j, k in enumerate(ks):
            v = b[f"recall@{k}"] or 0.0
            h = plot_h * v / ymax
            parts.append(f'<rect x="{x0 + j * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{colours[j % len(colours)]}"><title>{b["bucket"]}: recall@{k} '
                         f'{v:.4f} ({b["cases"]} cases)</title></rect>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
                     f'{b["bucket"]}</text>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{top + plot_h + 28}" text-anchor="middle" '
                     f'fill="#666">n={b["cases"]}</text>')
    for j, k in enumerate(ks):
        parts.append(f'<rect x="{left + 10 + j * 90}" y="{height - 14}" width="10" height="10" fill="{colours[j % len(colours)]}"/>'
                     f'<text x="{left + 24 + j * 90}" y="{height - 5}">recall@{k}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
