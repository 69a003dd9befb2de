"""The run summary (stage 9): ``reports/pipeline/<key>/summary.{json,md}`` from the stage records, and
the Markdown that ``learn run`` prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from learn_tasks import artifacts
from learn_tasks.config import Settings
from learn_tasks.orchestration.runs import PIPELINE_DAG, RunArgs, stage_results
from learn_tasks.storage import write_json, write_text


def summarize(cfg: Settings, a: RunArgs, tasks: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``reports/pipeline/<key>/summary.{json,md}`` from the stage records; return the JSON part."""
    st = stage_results(cfg, a)
    encodes = [v for k, v in st.items() if k.startswith("encode_") and k != "encode_items" and v]
    summary = {
        "run": a.as_dict(),
        "tasks": list(tasks or []),
        "validation": _pick(st.get("validate"), ("interactions", "items", "passed", "reports", "data_docs",
                                                 "quarantine", "published")),
        "encoding": {"shards": len(encodes), **{k: sum(int(e.get(k) or 0) for e in encodes)
                                                for k in ("encoded", "skipped", "quarantined", "total")},
                     "fingerprint": encodes[0].get("fingerprint") if encodes else None,
                     "store": encodes[0].get("store") if encodes else None} if encodes else None,
        "features": _pick(st.get("features"), ("store", "rows", "window", "rebuilt", "materialized")),
        "training": st.get("train"),
        "evaluation": st.get("evaluate"),
        "promotion": st.get("gate"),
        "milvus": st.get("milvus"),
        "monitoring": st.get("monitor"),
    }
    out = cfg.paths.reports("pipeline") / a.key
    summary["reports"] = {
        "summary": str(out / "summary.md"),
        "validation": (st.get("validate") or {}).get("reports"),
        "data_docs": (st.get("validate") or {}).get("data_docs"),
        "quarantine": (st.get("validate") or {}).get("quarantine"),
        "evaluation": ((st.get("evaluate") or {}).get("test") or {}).get("report"),
        "monitoring": (st.get("monitor") or {}).get("report"),
    }
    write_json(summary, out / "summary.json")
    write_text(render_summary(summary), out / "summary.md")
    artifacts.publish(cfg, out)
    return summary


def _pick(d: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, Any] | None:
    return None if d is None else {k: d.get(k) for k in keys if k in d}


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_summary(s: Mapping[str, Any]) -> str:
    """The summary as Markdown (what ``learn run`` prints)."""
    r = s["run"]
    lines = [f"# {PIPELINE_DAG}: {r['dataset']} ({r['mode']}), interval {r['start']} .. {r['end']}", ""]
    if s.get("tasks"):
        lines += ["## Tasks", "", "| task | state | seconds |", "|---|---|---|"]
        lines += [f"| {t['task']} | {t['state']} | {_f(t.get('seconds'), 1)} |" for t in s["tasks"]]
        lines.append("")
    v = s.get("validation")
    if v:
        lines += ["## Validation (Great Expectations)", ""]
        for table in ("interactions", "items"):
            t = v.get(table)
            if t:
                checks = ", ".join(f"{k} {n}" for k, n in t["by_check"].items()) or "none"
                lines.append(f"- {table}: {t['read']} read = {t['accepted']} accepted + {t['quarantined']} "
                             f"quarantined ({t['failed_share']:.2%}); failed checks: {checks}")
        pub = v.get("published") or {}
        if pub:
            lines.append(f"- published: {pub.get('interactions')} interactions, {pub.get('items')} items"
                         + (" (dataset updated)" if pub.get("changed") else " (dataset unchanged)"))
        lines.append("")
    e = s.get("encoding")
    if e:
        lines += ["## Content embeddings (CEG)", "",
                  f"- {e['encoded']} items encoded, {e['skipped']} already up to date, {e['quarantined']} "
                  f"quarantined, over {e['shards']} shard(s); version {e['fingerprint']}", ""]
    f = s.get("features")
    if f:
        lines += ["## Features (Feast)", "", f"- store {f.get('store')}; rows {f.get('rows')}; "
                  f"materialised: {f.get('materialized')}", ""]
    t = s.get("training")
    if t:
        val = ", ".join(f"{k} {_f(v)}" for k, v in (t.get("val") or {}).items())
        lines += ["## Training (PCH)", "",
                  f"- run {t.get('run_id')} ({t.get('kind')}, {t.get('protocol')}): {t.get('epochs_run')} epoch(s), "
                  f"stopped by {t.get('stopped')}, {_f(t.get('train_seconds'), 1)} s; validation {val or '- (scored by the gate)'}"
                  + (f"; warm start from {Path(t['warm_start']).name}" if t.get("warm_start") else "")
                  + (f" (sparse update: {t.get('sparse_rows')} ID row(s) trained)" if t.get("update") == "sparse" else "")
                  + ("; reused (same inputs)" if t.get("reused") else "")]
        choice = t.get("choice")
        if choice:  # pipeline.challengers: every kind trained, the best on validation is the candidate
            lines.append(f"- candidate kind chosen on validation {choice['metric']}: " + ", ".join(
                f"{c['kind']} {_f(c.get('val'))}{' (chosen)' if c['kind'] == choice['chosen'] else ''}"
                for c in choice["kinds"]))
        lines.append("")
    ev = s.get("evaluation")
    if ev:
        table = ev["test"]["table"]
        cols = [c for c in ("recall@10", "ndcg@10", "recall@50", "recall@200", "ndcg@200", "mrr")
                if any(c in row for row in table.values())]
        lines += [f"## Evaluation (test, {ev['protocol']}, {ev['test']['users']} users)", "",
                  "| slice | cases | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, row in table.items():
            lines.append(f"| {name} | {row.get('cases')} | " + " | ".join(_f(row.get(c)) for c in cols) + " |")
        lines.append("")
    g = s.get("promotion")
    if g:
        lines += ["## Promotion gate", "",
                  f"- {'PROMOTED' if g['promoted'] else 'KEPT CURRENT'}: {g['reason']} "
                  f"({g['metric']} on validation)", f"- serving: {g.get('serving')}", ""]
        if g.get("slices"):
            lines += ["| slice | cases | candidate | current | floor | difference [95%] | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for name, row in g["slices"].items():
                d = row.get("difference")
                lines.append(f"| {name} | {row.get('cases')} | {_f(row.get('candidate'))} | {_f(row.get('current'))} | "
                             f"{_f(row.get('floor'))} | "
                             + (f"{_f(d['mean'])} [{_f(d['lo'])}, {_f(d['hi'])}]" if d else "-")
                             + f" | {row.get('status')} |")
            lines.append("")
    m = s.get("milvus")
    if m:
        lines += ["## Milvus", "", f"- collection {m.get('collection')} behind alias {m.get('alias')}: "
                  f"{m.get('rows')} items, index recall@10 {_f(m.get('index_recall_at_10'))}",
                  f"- release {m.get('release_id')}: "
                  + ("released by this run (the service swaps to it)" if m.get("released")
                     else "unchanged (this run released nothing new)"), ""]
    mo = s.get("monitoring")
    if mo:
        lines += ["## Monitoring (Evidently)", "", f"- {mo.get('alert_count', 0)} alert(s); report {mo.get('report')}"]
        for al in (mo.get("alerts") or [])[:10]:
            lines.append(f"  - {al.get('slice')}: {al.get('metric')} = {_f(al.get('value'))} "
                         f"(threshold {_f(al.get('threshold'))})")
        lines.append("")
    lines += ["## Reports", ""] + [f"- {k}: {v}" for k, v in s["reports"].items() if v] + [""]
    return "\n".join(lines)


def summarize_task(cfg: Settings, a: RunArgs) -> dict[str, Any]:
    """The ``summarize`` task: write the summary and hand on only where it is (a small XCom)."""
    return {"summary": summarize(cfg, a)["reports"]["summary"]}
