"""Monitoring: Evidently reports on cold-start and long-tail drift, an on-call dashboard, threshold alerts.

LEARN exists for the items and users that ID models serve badly (cold-start and long-tail), so that is what
this stage watches. Each run compares two windows of the temporal split:

* **reference** = the training window (``split == train``, before the current window). It defines the
  item slices exactly as evaluation does (:func:`learn_tasks.pch.catalogue.item_slices`): ``cold_start`` = no
  training event, ``long_tail`` = the least popular warm items holding ``evaluate.tail_share`` of training
  events, ``head`` = the other warm items.
* **current** = the newest window: the split's test window (events after the cut-off) by default, or an
  explicit ``[current_start, current_end)``.

One Evidently report (and one workspace snapshot) per section:

* ``interactions`` (a row per event): share of events on cold-start items; among events on warm items,
  the share on long-tail and head items (so a surge of new items does not read as a long-tail collapse);
  drift of the training popularity (log) of the warm items people consume.
* ``users`` (a row per active user): new-user share, events per user in the window, sequence length (the
  user's events up to the window end). Activity is compared with the last stretch of the training window
  that is as long as the current window: a three-month window cannot be compared with years of history.
* ``content``: content-embedding drift of the items first seen in the current window against the
  catalogue (Evidently's classifier embedding-drift method: ROC AUC of a model telling new items from
  catalogue items; 0.5 = indistinguishable, 1 = a different kind of item); the report shows where the
  new items sit along the catalogue's leading principal directions.
* ``summary`` (one row): every monitored value and every threshold. The dashboard's panels read it, and
  each threshold is an Evidently test on it, so the UI shows the same pass/fail as the alerts here.

Recommendation behaviour per slice comes from the newest evaluation of ``monitor.eval_model`` (None: the
promoted model's kind, else ``pipeline.model``) under ``$LEARN_HOME/reports/eval/<dataset>/*/metrics.json``
(Recall/NDCG@K and MRR per slice, catalogue coverage, exposure share of cold-start and long-tail items in the
top-K, and score quantiles when the evaluation writes them); a missing evaluation is a note, not an error.

A value crossing its threshold (``cfg.monitor``; see ``monitoring/thresholds.md``) is an alert
``{slice, metric, value, threshold, kind, message}``. Outputs: ``report.html`` (alerts, values, and the
section reports), ``summary.json`` and the section snapshots under
``$LEARN_HOME/reports/monitoring/<date>/<dataset>/``; snapshots in the Evidently workspace
``$LEARN_HOME/evidently/`` (project ``learn monitoring: <dataset>``, dashboard from
``monitoring/dashboard.yaml``); per-run values in ``reports/monitoring/history/<dataset>.json``.
Re-running with the same ``run_id`` replaces that run's outputs and snapshots.

This module is the entry point (:func:`monitor_window`, the sections, the report page); the parts live in
``rules`` (thresholds, alerts), ``frames`` (windows, per-event / per-user frames), ``reports`` (Evidently
reports), ``quality`` (the tracked evaluation) and ``dashboard`` (workspace, dashboard, history, UI).
"""
from __future__ import annotations

import html
import logging
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import artifacts
from learn_tasks import schema as S
from learn_tasks.config import MonitorConfig, Settings
from learn_tasks.data import datasets, splits
from learn_tasks.monitoring.dashboard import (dashboard_model, history_path, load_dashboard_spec, load_history,
                                              open_project, previous_values)
from learn_tasks.monitoring.frames import (Windows, content_frames, event_frame, item_table, sample_rows, user_frame,
                                           windows)
from learn_tasks.monitoring.quality import eval_values, latest_eval
from learn_tasks.monitoring.reports import (SUMMARY_TAG, content_report, drift_name, embedding_drift, evidently_dataset,
                                            evidently_env, interactions_report, principal_components, snapshot_values,
                                            summary_report, users_report)
from learn_tasks.monitoring import online
from learn_tasks.monitoring.rules import SLICE_NEW_USERS, SLICE_ONLINE, check_thresholds, finite, fmt, raise_for_alerts, thresholds
from learn_tasks.storage import atomic_dir, write_json

log = logging.getLogger("learn.monitor")

SECTIONS = ("interactions", "users", "content", "online")


# ==================================================================================================
# Sections of a run
# ==================================================================================================
def _interactions_section(w: Windows, items: pd.DataFrame, mc: MonitorConfig, evaluate_section,
                          values: dict[str, float], thin: set[str]) -> None:
    cur = event_frame(w.current, items)
    ref = event_frame(sample_rows(w.reference, mc.max_reference_rows, mc.seed), items)
    n_warm = int(cur["log_popularity"].notna().sum())
    v = evaluate_section("interactions", interactions_report(mc, warm=n_warm > 0, drift=n_warm >= mc.min_rows),
                         cur, ref)
    values[f"{S.SLICE_COLD_START}.event_share"] = float(v["MeanValue(column=is_cold_start)"])
    cold_items = w.current.loc[cur["is_cold_start"].to_numpy(bool), S.ITEM_ID]
    values[f"{S.SLICE_COLD_START}.items"] = float(cold_items.nunique())
    for key, name in ((f"{S.SLICE_LONG_TAIL}.event_share", "MeanValue(column=is_long_tail)"),
                      (f"{S.SLICE_HEAD}.event_share", "MeanValue(column=is_head)"),
                      (f"{S.SLICE_ALL}.popularity_drift", drift_name(v, "log_popularity"))):
        if name is not None and finite(v.get(name)):
            values[key] = float(v[name])
    if len(cur) < mc.min_rows:
        thin.add(f"{S.SLICE_COLD_START}.event_share")
    if n_warm < mc.min_rows:
        thin.update({f"{S.SLICE_LONG_TAIL}.event_share", f"{S.SLICE_ALL}.popularity_drift"})


def _users_section(w: Windows, cfg: Settings, evaluate_section, values: dict[str, float], thin: set[str],
                   notes: list[str]) -> int:
    mc, cum = cfg.monitor, cfg.evaluate.cold_user_max_events
    cur = user_frame(w.current, w.history, w.reference[S.USER_ID].unique(), cum, w.reference)
    before = w.reference[w.reference[S.EVENT_TIMESTAMP] < w.recent_start]
    ref = user_frame(w.recent, w.reference, before[S.USER_ID].unique(), cum, before)
    if ref.empty:
        notes.append("users: no training events in the stretch before the cut-off; activity drift left out")
    v = evaluate_section("users", users_report(mc, drift=len(cur) >= mc.min_rows and not ref.empty), cur,
                         cur if ref.empty else ref)
    values[f"{SLICE_NEW_USERS}.user_share"] = float(v["MeanValue(column=is_new_user)"])
    values[f"{S.SLICE_COLD_USERS}.user_share"] = float(v["MeanValue(column=is_cold_user)"])
    values[f"{S.SLICE_ALL}.events_per_user"] = float(v["MeanValue(column=events_in_window)"])
    values[f"{S.SLICE_ALL}.sequence_length_p50"] = float(v["QuantileValue(column=sequence_length,quantile=0.5)"])
    for col, key in (("events_in_window", "events_per_user_drift"), ("sequence_length", "sequence_length_drift")):
        name = drift_name(v, col)
        if name is not None:
            values[f"{S.SLICE_ALL}.{key}"] = float(v[name])
    if len(cur) < mc.min_rows:
        thin.add(f"{SLICE_NEW_USERS}.user_share")
    return len(cur)


# ==================================================================================================
# Entry point
# ==================================================================================================
def _online_section(cfg: Settings, dataset: str, start: Any, end: Any, evaluate_section, values: dict[str, float],
                    thin: set[str], notes: list[str]) -> dict[str, str]:
    """Live traffic of the served and event logs (:mod:`learn_tasks.monitoring.online`); returns its window."""
    try:
        t = online.traffic_window(cfg, dataset, start, end)
    except Exception as exc:  # noqa: BLE001 - a log that cannot be read is a note, the offline report goes on
        notes.append(f"live traffic: the event log could not be read ({exc}); online values left out")
        return {}
    frame = online.served_frame(t)
    report_values = evaluate_section("online", online.online_report(), frame, None) if len(frame) else None
    values.update(online.online_values(t, report_values))
    if t.served.empty:
        notes.append(f"live traffic: no served response logged in [{t.start}, {t.end})")
    if len(t.served) < cfg.monitor.min_rows:
        if len(t.served):
            notes.append(f"live traffic: only {len(t.served)} served response(s): reported, no alert on its shares "
                         f"and latency (fewer than monitor.min_rows = {cfg.monitor.min_rows})")
        thin.update(f"{SLICE_ONLINE}.{m}" for m in ("fallback_share", "latency_ms_p99", "hit_rate",
                                                     "cold_start_exposure", "long_tail_exposure"))
    return {"online": [str(t.start), str(t.end)]}


def monitor_window(cfg: Settings, dataset: str, current_start: str | None = None, current_end: str | None = None,
                   *, run_id: str | None = None, run_date: str | None = None,
                   embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                   fail_on_alert: bool = False, online_start: Any = None, online_end: Any = None) -> dict[str, Any]:
    """Monitor ``dataset``: reports, workspace snapshots and alerts (see the module docstring).

    ``current_start`` / ``current_end``: ISO times of the current window ``[start, end)`` (default: the
    temporal split's test window). ``run_id`` names the run (default: a new one); re-running an id replaces
    its outputs. ``run_date`` (``YYYY-MM-DD``, default today in UTC) names the report folder.
    ``embeddings`` = ``(item_ids, vectors)`` instead of the CEG store. ``online_start`` / ``online_end``: the
    live-traffic window in log time (default: the ``monitor.online_window_h`` hours before now). With ``fail_on_alert`` a run with
    alerts raises :class:`MonitoringAlert` after writing everything.

    Returns ``{"dataset", "run_id", "alerts": [{slice, metric, value, threshold, kind, message}], "report"
    (HTML path), "summary" (JSON path), "values", "thresholds", "previous", "window", "sections", "notes",
    "workspace", "project_id", "snapshots"}``.
    """
    evidently_env()
    mc = cfg.monitor
    now = datetime.now(timezone.utc)
    run_id = run_id or f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    run_date = run_date or f"{now:%Y-%m-%d}"
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_date):
        raise ValueError(f"run_date must look like YYYY-MM-DD, got {run_date!r}")
    notes: list[str] = []

    split = splits.load_split(cfg, dataset, S.PROTOCOL_TEMPORAL)
    w = windows(split, current_start, current_end)
    if w.reference.empty:
        raise ValueError(f"dataset {dataset!r}: no training events before {w.start}; nothing to compare with")
    all_items = np.union1d(datasets.load_items(cfg, dataset)[S.ITEM_ID].to_numpy(np.int64),
                           split[S.ITEM_ID].to_numpy(np.int64))
    items = item_table(w.reference, all_items, cfg.evaluate.tail_share)
    # Every snapshot of a run carries the same time, metadata and run name; its tag names the section.
    stamp = now.replace(tzinfo=None)  # the workspace compares naive UTC timestamps
    meta = {"dataset": dataset, "run_id": run_id, "run_date": run_date,
            "window": f"{w.start.isoformat()}/{w.end.isoformat()}"}

    def evaluate_section(section: str, report, cur: pd.DataFrame, ref: pd.DataFrame | None):
        snapshots[section] = report.run(evidently_dataset(cur), None if ref is None else evidently_dataset(ref),
                                        timestamp=stamp, tags=[section], metadata=dict(meta),
                                        name=f"{dataset} {section} {run_id}")
        return snapshot_values(snapshots[section])

    values: dict[str, float] = {f"{S.SLICE_ALL}.events": float(len(w.current))}
    thin: set[str] = set()  # values measured on too few rows to alert on
    snapshots: dict[str, Any] = {}
    if w.current.empty:
        notes.append(f"no events in the current window [{w.start}, {w.end})")
    else:
        values[f"{S.SLICE_ALL}.users"] = float(w.current[S.USER_ID].nunique())
        values[f"{S.SLICE_ALL}.items"] = float(w.current[S.ITEM_ID].nunique())
        _interactions_section(w, items, mc, evaluate_section, values, thin)
        n_users = _users_section(w, cfg, evaluate_section, values, thin, notes)
        if thin:
            notes.append(f"only {len(w.current)} event(s) and {n_users} user(s) in the window: no alert on "
                         f"{', '.join(sorted(thin))} (fewer than monitor.min_rows = {mc.min_rows} behind them)")
        emb_frames = content_frames(cfg, dataset, w, items, embeddings, notes)
        if emb_frames is not None:
            cur_e, ref_e = emb_frames
            score = embedding_drift(cur_e, ref_e, mc)
            pc_cur, pc_ref = principal_components(cur_e.to_numpy(), ref_e.to_numpy(), mc.embedding_report_components)
            # the score beside the components; the catalogue against itself is 0.5 by definition
            pc_cur["embedding_drift"], pc_ref["embedding_drift"] = score, 0.5
            evaluate_section("content", content_report(list(pc_cur.columns[:-1])), pc_cur, pc_ref)
            values[f"{S.SLICE_COLD_START}.embedding_drift"] = score
            values[f"{S.SLICE_COLD_START}.items_encoded"] = float(len(cur_e))

    # --- live traffic: the served and event logs
    online_window = _online_section(cfg, dataset, online_start, online_end, evaluate_section, values, thin, notes)

    # --- recommendation behaviour from the newest evaluation
    eval_path, metrics, note = latest_eval(cfg, dataset)
    if note:
        notes.append(note)
    else:
        values.update(eval_values(metrics, mc.exposure_k))
        if "scores" not in metrics:
            notes.append(f"score distributions: the evaluation {eval_path} records no 'scores'")

    # --- thresholds, alerts, summary snapshot
    history = load_history(cfg, dataset)
    previous = previous_values(history, run_id)
    limits = {k: t for k, t in thresholds(mc, previous).items() if k.rsplit(".", 1)[0] not in thin}
    alerts = check_thresholds(values, limits, mc, previous)
    values[f"{S.SLICE_ALL}.alerts"] = float(len(alerts))
    sections = dict(snapshots)
    snapshots.clear()
    evaluate_section(SUMMARY_TAG, *summary_report(values, limits), None)
    snapshots.update(sections)  # the summary first: it is what the dashboard reads

    # --- files
    out = cfg.paths.reports("monitoring") / run_date / dataset
    window = {"reference": [str(w.reference[S.EVENT_TIMESTAMP].min()), str(w.reference_end)],
              "current": [str(w.start), str(w.end)], "activity_reference": [str(w.recent_start), str(w.reference_end)], **online_window}
    result: dict[str, Any] = {
        "dataset": dataset, "run_id": run_id, "run_date": run_date, "created": now.isoformat(),
        "alerts": alerts, "report": str(out / "report.html"), "summary": str(out / "summary.json"),
        "values": values, "thresholds": limits, "previous": previous, "window": window,
        # The summary has no page of its own: its values are the report's table, its tests are in the UI.
        "sections": {name: str(out / f"{name}.html") for name in snapshots if name != SUMMARY_TAG},
        "snapshot_files": {name: str(out / "snapshots" / f"{name}.json") for name in snapshots},
        "evaluation": str(eval_path) if eval_path else None, "notes": notes,
        "workspace": str(cfg.paths.evidently()),
    }
    with atomic_dir(out) as tmp:
        (tmp / "snapshots").mkdir()
        for name, snap in snapshots.items():
            if name in result["sections"]:  # about 0.5 s and 4 MB for the summary's one-value histograms
                snap.save_html(str(tmp / f"{name}.html"))
            (tmp / "snapshots" / f"{name}.json").write_text(snap.dumps(), encoding="utf-8")
        (tmp / "report.html").write_text(index_html(result), encoding="utf-8")
        write_json(result, tmp / "summary.json")

    # --- workspace: replace this run's earlier snapshots, add the new ones, rewrite the dashboard
    ws, project = open_project(cfg, dataset)
    old = history.get("runs", {}).get(run_id, {}).get("snapshots", [])
    existing = {str(s) for s in ws.list_runs(project.id)}
    for sid in old:
        if sid in existing:
            ws.delete_run(project.id, sid)
    ids = [str(ws.add_run(project.id, snap, include_data=False).id) for snap in snapshots.values()]
    ws.save_dashboard(project.id, dashboard_model(load_dashboard_spec(mc.dashboard_file), limits, mc))
    result.update(project_id=str(project.id), snapshots=ids)
    history.setdefault("runs", {})[run_id] = {"created": now.isoformat(), "run_date": run_date, "values": values,
                                              "alerts": len(alerts), "snapshots": ids, "report": result["report"]}
    write_json(history, history_path(cfg, dataset))
    write_json(result, out / "summary.json")
    artifacts.publish(cfg, out)  # a URL home: the report and the history every host's next run reads
    artifacts.publish_file(cfg, history_path(cfg, dataset))
    for a in alerts:
        log.warning("monitoring alert for %s: %s", dataset, a["message"])
    if fail_on_alert:
        raise_for_alerts(result)
    return result


# ==================================================================================================
# The top-level report page
# ==================================================================================================
def index_html(result: dict[str, Any]) -> str:
    """One page for on-call: alerts, every value against its threshold, notes, and the section reports."""
    e = html.escape
    limits, values, prev = result["thresholds"], result["values"], result.get("previous") or {}
    rows = []
    for key in sorted(values):
        lim = " ".join(f"{kind} {fmt(limits[f'{key}.{kind}'])}" for kind in ("min", "max")
                       if f"{key}.{kind}" in limits)
        bad = any(f"{a['slice']}.{a['metric']}" == key for a in result["alerts"])
        rows.append(f"<tr class='{'bad' if bad else ''}'><td>{e(key)}</td><td>{fmt(values[key])}</td>"
                    f"<td>{fmt(prev[key]) if key in prev else ''}</td><td>{e(lim)}</td></tr>")
    alerts = "".join(f"<li>{e(a['message'])}</li>" for a in result["alerts"]) or "<li>none</li>"
    notes = "".join(f"<li>{e(n)}</li>" for n in result["notes"]) or "<li>none</li>"
    # The summary section is the table above; Evidently's view of it, each threshold a test, is the run's
    # "summary" snapshot in the Evidently UI (and snapshots/summary.json). The other sections are embedded.
    sections = "".join(
        f"<h2>{e(name)}</h2><p><a href='{e(name)}.html'>open {e(name)}.html</a></p>"
        f"<iframe src='{e(name)}.html' title='{e(name)}' loading='lazy'></iframe>"
        for name in result["sections"])
    win = result["window"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>learn monitoring: {e(result['dataset'])} {e(result['run_date'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}tr.bad td{{background:#fdd}}
iframe{{width:100%;height:900px;border:1px solid #ccc}}</style></head><body>
<h1>Monitoring: {e(result['dataset'])}</h1>
<p>Run <code>{e(result['run_id'])}</code> ({e(result['created'])}). Current window {e(win['current'][0])} to
{e(win['current'][1])}; reference = training window {e(win['reference'][0])} to {e(win['reference'][1])};
user activity compared with {e(win['activity_reference'][0])} to {e(win['activity_reference'][1])}.</p>
<h2 id="alerts">Alerts ({len(result['alerts'])})</h2><ul>{alerts}</ul>
<h2>Values</h2><table><tr><th>slice.metric</th><th>value</th><th>previous run</th><th>threshold</th></tr>
{''.join(rows)}</table>
<h2>Notes</h2><ul>{notes}</ul>
{sections}
</body></html>
"""
