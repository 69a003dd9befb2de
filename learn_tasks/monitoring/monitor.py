"""Monitoring: Evidently reports on cold-start and long-tail drift, an on-call dashboard, threshold alerts.

LEARN exists for the items and users that ID models serve badly (cold-start and long-tail), so that is what
this stage watches. Each run compares two windows of the temporal split:

* **reference** = the training window (``split == train``, before the current window). It defines the
  item slices exactly as evaluation does (:func:`learn_tasks.evaluation.evaluate.item_slices`): ``cold_start`` = no
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

Recommendation behaviour per slice comes from the newest evaluation of ``monitor.eval_model`` under
``$LEARN_HOME/reports/eval/<dataset>/*/metrics.json`` (Recall/NDCG@K and MRR per slice, catalogue
coverage, exposure share of cold-start and long-tail items in the top-K, and score quantiles when the
evaluation writes them); a missing evaluation is a note, not an error.

A value crossing its threshold (``cfg.monitor``; see ``monitoring/thresholds.md``) is an alert
``{slice, metric, value, threshold, kind, message}``. Outputs: ``report.html`` (alerts, values, and the
section reports), ``summary.json`` and the section snapshots under
``$LEARN_HOME/reports/monitoring/<date>/<dataset>/``; snapshots in the Evidently workspace
``$LEARN_HOME/evidently/`` (project ``learn monitoring: <dataset>``, dashboard from
``monitoring/dashboard.yaml``); per-run values in ``reports/monitoring/history/<dataset>.json``.
Re-running with the same ``run_id`` replaces that run's outputs and snapshots.
"""
from __future__ import annotations

import html
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import REPO_ROOT, MonitorConfig, Settings
from learn_tasks.storage import atomic_dir, read_json, write_json

log = logging.getLogger("learn.monitor")

SLICE_NEW_USERS = "new_users"  # users with no training event (a subset of schema.SLICE_COLD_USERS)
SECTIONS = ("interactions", "users", "content")
SUMMARY_TAG = "summary"
DASHBOARD_FILE = REPO_ROOT / "monitoring" / "dashboard.yaml"


class MonitoringAlert(RuntimeError):
    """Raised by :func:`raise_for_alerts` (and ``run(..., fail_on_alert=True)``); carries the alerts."""

    def __init__(self, alerts: list[dict[str, Any]], report: str | None = None):
        self.alerts, self.report = alerts, report
        lines = [a["message"] for a in alerts]
        super().__init__(f"{len(alerts)} monitoring alert(s): " + "; ".join(lines)
                         + (f" (report: {report})" if report else ""))


# ==================================================================================================
# Thresholds -> alerts (pure)
# ==================================================================================================
@dataclass(frozen=True)
class Rule:
    slice: str
    metric: str
    kind: str  # "max": alert when value > threshold; "min": alert when value < threshold
    field: str  # MonitorConfig field holding the threshold (None there switches the rule off)

    @property
    def key(self) -> str:
        return f"{self.slice}.{self.metric}"


def rules(mc: MonitorConfig) -> list[Rule]:
    k = mc.exposure_k
    return [
        Rule(S.SLICE_ALL, "events", "min", "min_current_events"),
        Rule(S.SLICE_COLD_START, "event_share", "max", "cold_start_share_max"),
        Rule(S.SLICE_LONG_TAIL, "event_share", "min", "long_tail_share_min"),
        Rule(S.SLICE_ALL, "popularity_drift", "max", "popularity_drift_max"),
        Rule(SLICE_NEW_USERS, "user_share", "max", "new_user_share_max"),
        Rule(S.SLICE_ALL, "events_per_user_drift", "max", "activity_drift_max"),
        Rule(S.SLICE_ALL, "sequence_length_drift", "max", "sequence_length_drift_max"),
        Rule(S.SLICE_COLD_START, "embedding_drift", "max", "embedding_drift_max"),
        Rule(S.SLICE_COLD_START, f"exposure@{k}", "min", "cold_start_exposure_min"),
        Rule(S.SLICE_LONG_TAIL, f"exposure@{k}", "min", "long_tail_exposure_min"),
    ]


def thresholds(mc: MonitorConfig, previous: dict[str, float] | None = None) -> dict[str, float]:
    """``{"<slice>.<metric>.<max|min>": threshold}`` for the rules that are on.

    Quality floors are relative: ``previous run's value * (1 - quality_drop_max)`` for every slice and
    metric in ``quality_metrics`` that the previous run recorded.
    """
    out: dict[str, float] = {}
    for r in rules(mc):
        t = getattr(mc, r.field)
        if t is not None:
            out[f"{r.key}.{r.kind}"] = float(t)
    if mc.quality_drop_max is not None and previous:
        for key, prev in previous.items():
            slc, _, metric = key.partition(".")
            if metric in mc.quality_metrics and slc in S.SLICES and _finite(prev) and prev > 0:
                out[f"{key}.min"] = float(prev) * (1.0 - mc.quality_drop_max)
    return out


def check_thresholds(values: dict[str, float], limits: dict[str, float], mc: MonitorConfig | None = None,
                     previous: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Alerts for every value beyond its threshold; a value that was not measured raises no alert."""
    fields = {f"{r.key}.{r.kind}": r.field for r in rules(mc)} if mc is not None else {}
    alerts = []
    for tkey, limit in limits.items():
        key, kind = tkey.rsplit(".", 1)
        value = values.get(key)
        if not _finite(value):
            continue
        crossed = value > limit if kind == "max" else value < limit
        if not crossed:
            continue
        slc, metric = key.split(".", 1)
        where = "above" if kind == "max" else "below"
        if tkey in fields:
            why = f"monitor.{fields[tkey]} = {_fmt(limit)}"
        else:  # a relative quality floor
            prev = (previous or {}).get(key)
            drop = mc.quality_drop_max if mc is not None else None
            why = f"previous run {_fmt(prev)}, monitor.quality_drop_max = {drop}"
        alerts.append({
            "slice": slc, "metric": metric, "value": float(value), "threshold": float(limit), "kind": kind,
            "message": f"slice {slc}: {metric} = {_fmt(value)} is {where} the threshold {_fmt(limit)} ({why})",
        })
    return alerts


def raise_for_alerts(result: dict[str, Any]) -> dict[str, Any]:
    """Raise :class:`MonitoringAlert` when a :func:`run` result has alerts; return it unchanged otherwise."""
    if result.get("alerts"):
        raise MonitoringAlert(result["alerts"], result.get("report"))
    return result


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def _fmt(x: Any) -> str:
    if not _finite(x):
        return str(x)
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.4g}"


# ==================================================================================================
# Windows and per-event / per-user frames (pure)
# ==================================================================================================
@dataclass
class Windows:
    reference: pd.DataFrame  # training events before the current window (defines slices)
    current: pd.DataFrame  # events in [start, end)
    recent: pd.DataFrame  # the last stretch of the reference as long as the current window (activity)
    history: pd.DataFrame  # every event before the current window end (sequence lengths)
    start: pd.Timestamp
    end: pd.Timestamp
    reference_end: pd.Timestamp
    recent_start: pd.Timestamp


def _utc(x: str | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(x)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def windows(split: pd.DataFrame, current_start: str | None = None, current_end: str | None = None) -> Windows:
    """Reference (training) and current windows of a temporal split; see the module docstring."""
    ts = split[S.EVENT_TIMESTAMP]
    test_cut = split.attrs.get("test_cutoff")
    if current_start is not None:
        start = _utc(current_start)
    elif test_cut:
        start = _utc(test_cut)
    else:
        test = ts[split[S.SPLIT] == S.TEST]
        start = test.min() if len(test) else ts.max()
    end = _utc(current_end) if current_end is not None else ts.max() + pd.Timedelta(seconds=1)
    if end <= start:
        raise ValueError(f"current window is empty: end {end} is not after start {start}")
    reference = split[(split[S.SPLIT] == S.TRAIN) & (ts < start)]
    current = split[(ts >= start) & (ts < end)]
    history = split[ts < end]
    ref_end = reference[S.EVENT_TIMESTAMP].max() + pd.Timedelta(seconds=1) if len(reference) else start
    recent_start = ref_end - (end - start)
    recent = reference[reference[S.EVENT_TIMESTAMP] >= recent_start]
    return Windows(reference, current, recent, history, start, end, ref_end, recent_start)


def item_table(reference: pd.DataFrame, item_ids: np.ndarray, tail_share: float) -> pd.DataFrame:
    """Per item: training popularity and slice flags (the same definition as evaluation)."""
    from learn_tasks.evaluation import evaluate

    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    pop = evaluate.item_popularity(reference, ids)
    tail = evaluate.tail_mask(pop, tail_share)
    return pd.DataFrame({S.POPULARITY: pop, S.IS_COLD_START: pop == 0, S.IS_LONG_TAIL: tail,
                         "is_head": (pop > 0) & ~tail}, index=pd.Index(ids, name=S.ITEM_ID))


def event_frame(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per event: cold-start flag; long-tail / head flags and log popularity on warm items only.

    Long-tail and head are NaN on cold-start events, so their means are shares *among warm events*: a
    surge of new items moves the cold-start share, not the long-tail share.
    """
    it = items.reindex(events[S.ITEM_ID].to_numpy())
    cold = it[S.IS_COLD_START].astype("boolean").fillna(True).to_numpy(bool)
    warm = ~cold
    return pd.DataFrame({
        "is_cold_start": cold.astype(float),
        "is_long_tail": np.where(warm, it[S.IS_LONG_TAIL].astype("boolean").fillna(False).to_numpy(float), np.nan),
        "is_head": np.where(warm, it["is_head"].astype("boolean").fillna(False).to_numpy(float), np.nan),
        "log_popularity": np.where(warm, np.log1p(it[S.POPULARITY].fillna(0).to_numpy(float)), np.nan),
    })


def user_frame(window: pd.DataFrame, history: pd.DataFrame, known_users: np.ndarray,
               cold_user_max_events: int, training: pd.DataFrame) -> pd.DataFrame:
    """One row per user active in ``window``: events in it, sequence length, new / cold user flags.

    ``history`` holds every event up to the window end (sequence length = what the model would see);
    ``known_users`` are the users with events before the window; ``training`` gives training counts.
    """
    if window.empty:
        return pd.DataFrame(columns=["events_in_window", "sequence_length", "is_new_user", "is_cold_user"])
    counts = window.groupby(S.USER_ID).size()
    users = counts.index.to_numpy()
    seq = history[history[S.USER_ID].isin(users)].groupby(S.USER_ID).size().reindex(users, fill_value=0)
    train_n = training[training[S.USER_ID].isin(users)].groupby(S.USER_ID).size().reindex(users, fill_value=0)
    return pd.DataFrame({
        "events_in_window": counts.to_numpy(float),
        "sequence_length": seq.to_numpy(float),
        "is_new_user": (~np.isin(users, known_users)).astype(float),
        "is_cold_user": (train_n.to_numpy() <= cold_user_max_events).astype(float),
    }, index=pd.Index(users, name=S.USER_ID)).reset_index(drop=True)


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return df.sample(n, random_state=seed) if n and len(df) > n else df


# ==================================================================================================
# Evaluation metrics (recommendation behaviour per slice)
# ==================================================================================================
_QUALITY = re.compile(r"^(recall|ndcg|hr)@\d+$|^mrr$")


def latest_eval(cfg: Settings, dataset: str) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The newest test-stage ``metrics.json`` of ``monitor.eval_model`` for ``dataset`` (or a note why none)."""
    root = cfg.paths.reports("eval") / dataset
    want = cfg.monitor.eval_model
    found: list[tuple[str, Path, dict]] = []
    for path in sorted(root.glob("*/metrics.json")) if root.is_dir() else []:
        try:
            m = read_json(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable evaluation %s: %s", path, exc)
            continue
        if not isinstance(m, dict):
            log.warning("skipping evaluation %s: not a JSON object", path)
            continue
        meta = m.get("meta") or {}
        if meta.get("stage", S.TEST) != S.TEST or (want and meta.get("model") != want):
            continue
        found.append((str(meta.get("created", "")), path, m))
    if not found:
        which = f"model {want!r}" if want else "any model"
        return None, None, (f"no evaluation of {which} for dataset {dataset!r} under {root}; recommendation "
                            f"metrics are left out (run `learn evaluate --dataset {dataset}`)")
    _, path, m = max(found, key=lambda t: (t[0], t[1].stat().st_mtime))
    return path, m, None


def eval_values(metrics: dict[str, Any], k: int) -> dict[str, float]:
    """Flatten an evaluation's metrics into ``<slice>.<metric>`` values.

    Reads ``{slice: {"recall@K", "ndcg@K", "hr@K", "mrr"}}``, ``coverage: {"coverage@K",
    "cold_start_share@K", "long_tail_share@K"}`` (exposure share of those items in the top-K) and, when
    present, ``scores: {slice: {"p10"|"p50"|"p90"|"mean": score}}`` (scores of the recommended items).
    """
    out: dict[str, float] = {}
    for slc in S.SLICES:
        for name, v in (metrics.get(slc) or {}).items():
            if _QUALITY.match(name) and _finite(v):
                out[f"{slc}.{name}"] = float(v)
    cov = metrics.get("coverage") or {}
    for name, v in cov.items():
        if not _finite(v):
            continue
        m = re.match(r"^(coverage|cold_start_share|long_tail_share)@(\d+)$", name)
        if not m:
            continue
        kind, kk = m.groups()
        if kind == "coverage":
            out[f"{S.SLICE_ALL}.coverage@{kk}"] = float(v)
        else:
            out[f"{kind.removesuffix('_share')}.exposure@{kk}"] = float(v)
    for slc, stats in (metrics.get("scores") or {}).items():
        if slc in S.SLICES and isinstance(stats, dict):
            for name, v in stats.items():
                if _finite(v):
                    out[f"{slc}.score_{name}"] = float(v)
    return out


# ==================================================================================================
# Evidently sections
# ==================================================================================================
def _evidently_env() -> None:
    # Evidently reports anonymous usage unless told not to; nothing here may reach the network.
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _dataset(df: pd.DataFrame, embeddings: dict[str, list[str]] | None = None):
    from evidently import DataDefinition, Dataset

    return Dataset.from_pandas(df, data_definition=DataDefinition(numerical_columns=list(df.columns),
                                                                  embeddings=embeddings))


def _values_of(snapshot) -> dict[str, float]:
    """``{metric display key: value}`` of a snapshot's single-value metrics, keyed as the section names them."""
    out = {}
    for m in snapshot.dict()["metrics"]:
        out[m["metric_name"]] = m["value"]
    return out


def interactions_report(mc: MonitorConfig, warm: bool = True, drift: bool = True):
    """Event shares per slice; with ``warm`` the long-tail / head shares, with ``drift`` popularity drift."""
    from evidently import Report
    from evidently.metrics import MeanValue, QuantileValue, RowCount, ValueDrift

    metrics = [RowCount(), MeanValue(column="is_cold_start")]
    if warm:
        metrics += [MeanValue(column="is_long_tail"), MeanValue(column="is_head"),
                    QuantileValue(column="log_popularity", quantile=0.5),
                    QuantileValue(column="log_popularity", quantile=0.9)]
    if warm and drift:
        metrics.append(ValueDrift(column="log_popularity", method="wasserstein", threshold=mc.popularity_drift_max))
    return Report(metrics)


def users_report(mc: MonitorConfig, drift: bool = True):
    """New / cold user shares and activity; with ``drift`` its drift against the training window's end."""
    from evidently import Report
    from evidently.metrics import MeanValue, QuantileValue, RowCount, ValueDrift

    metrics = [RowCount(), MeanValue(column="is_new_user"), MeanValue(column="is_cold_user"),
               MeanValue(column="events_in_window"), QuantileValue(column="sequence_length", quantile=0.5)]
    if drift:
        metrics += [
            ValueDrift(column="events_in_window", method="wasserstein", threshold=mc.activity_drift_max),
            ValueDrift(column="sequence_length", method="wasserstein", threshold=mc.sequence_length_drift_max)]
    return Report(metrics)


def embedding_drift(cur: pd.DataFrame, ref: pd.DataFrame, mc: MonitorConfig) -> float:
    """Evidently's classifier embedding-drift method: ROC AUC of a model telling ``cur`` rows from ``ref`` rows.

    Called directly rather than through the ``EmbeddingsDrift`` report metric, whose t-SNE picture costs
    minutes on two cores even for a few hundred items; the score is the same computation.
    """
    from evidently.metrics.embeddings import ModelDriftMethod

    method = ModelDriftMethod(threshold=mc.embedding_drift_max if mc.embedding_drift_max is not None else 0.55,
                              pca_components=mc.embedding_pca_components or None)
    score, _, _ = method(cur.copy(), ref.copy())  # the method adds a label column to its inputs
    return float(score)


def principal_components(cur: np.ndarray, ref: np.ndarray, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sets projected on the catalogue's (reference's) leading ``n`` principal directions."""
    mean = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    basis = vt[: max(1, min(n, vt.shape[0]))].T
    cols = [f"pc{i + 1}" for i in range(basis.shape[1])]
    return (pd.DataFrame((cur - mean) @ basis, columns=cols), pd.DataFrame((ref - mean) @ basis, columns=cols))


def content_report(columns: Sequence[str]):
    """Where new items sit along the catalogue's main content directions (one drift widget per component)."""
    from evidently import Report
    from evidently.metrics import MeanValue, RowCount, ValueDrift

    return Report([RowCount(), MeanValue(column="embedding_drift")]
                  + [ValueDrift(column=c, method="wasserstein") for c in columns])


def _content_frames(cfg: Settings, dataset: str, w: Windows, items: pd.DataFrame,
                    embeddings: tuple[np.ndarray, np.ndarray] | None, notes: list[str]):
    """(new items of the window, catalogue sample) embedding frames, or None with a note saying why."""
    mc = cfg.monitor
    if embeddings is None:
        try:
            from learn_tasks.ceg import encode
        except ImportError:
            notes.append("content embeddings: the encode stage is not installed; embedding drift left out")
            return None
        try:
            embeddings = encode.load_embeddings(cfg, dataset)
        except FileNotFoundError as exc:
            notes.append(f"content embeddings: {exc}; embedding drift left out")
            return None
    ids, emb = np.asarray(embeddings[0], dtype=np.int64), np.asarray(embeddings[1], dtype=np.float32)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"content embeddings of {dataset!r}: {len(ids)} ids but an array of shape {emb.shape}")
    cur_items = np.unique(w.current[S.ITEM_ID].to_numpy(np.int64))
    new = cur_items[items[S.IS_COLD_START].reindex(cur_items).astype("boolean").fillna(True).to_numpy(bool)]
    warm = items.index[~items[S.IS_COLD_START].to_numpy(bool)].to_numpy()
    has = pd.Series(np.arange(len(ids)), index=ids)
    new_rows = has.reindex(new).dropna().to_numpy(np.int64)
    ref_rows = has.reindex(warm).dropna().to_numpy(np.int64)
    missing = len(new) - len(new_rows)
    if missing:
        notes.append(f"content embeddings: {missing} of {len(new)} new item(s) are not encoded yet")
    if len(new_rows) < mc.embedding_min_items or len(ref_rows) < mc.embedding_min_items:
        notes.append(f"content embeddings: {len(new_rows)} encoded new item(s) and {len(ref_rows)} catalogue "
                     f"item(s); at least {mc.embedding_min_items} of each are needed; embedding drift left out")
        return None
    rng = np.random.default_rng(mc.seed)
    if len(new_rows) > mc.embedding_max_current:
        new_rows = rng.choice(new_rows, mc.embedding_max_current, replace=False)
    if len(ref_rows) > mc.embedding_max_reference:
        ref_rows = rng.choice(ref_rows, mc.embedding_max_reference, replace=False)
    cols = [f"e{i}" for i in range(emb.shape[1])]
    return pd.DataFrame(emb[np.sort(new_rows)], columns=cols), pd.DataFrame(emb[np.sort(ref_rows)], columns=cols)


def summary_report(values: dict[str, float], limits: dict[str, float]):
    """One row with every value and threshold; thresholds are tests on the values (pass/fail in the UI)."""
    from evidently import Report
    from evidently.metrics import MeanValue
    from evidently.tests import gte, lte

    metrics = []
    for key in sorted(values):
        tests = []
        for kind, make in (("max", lte), ("min", gte)):
            if f"{key}.{kind}" in limits:
                tests.append(make(limits[f"{key}.{kind}"]))
        metrics.append(MeanValue(column=key, tests=tests or None))
    for key in sorted(limits):
        metrics.append(MeanValue(column=key))
    row = {**{k: [float(v)] for k, v in values.items()}, **{k: [float(v)] for k, v in limits.items()}}
    return Report(metrics), pd.DataFrame(row)


# ==================================================================================================
# Workspace and dashboard
# ==================================================================================================
def workspace_path(cfg: Settings) -> Path:
    return cfg.paths.home / "evidently"


def project_name(cfg: Settings, dataset: str) -> str:
    return cfg.monitor.project.format(dataset=dataset)


def open_project(cfg: Settings, dataset: str):
    """(workspace, project) for ``dataset``, creating the project on first use."""
    _evidently_env()
    from evidently.ui.workspace import Workspace

    path = workspace_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(path))
    name = project_name(cfg, dataset)
    found = ws.search_project(name)
    if found:
        return ws, found[0]
    project = ws.create_project(name, description=f"Cold-start and long-tail monitoring of dataset {dataset!r}: "
                                                  "one point per monitoring run; thresholds from cfg.monitor.")
    return ws, project


def load_dashboard_spec(path: str | Path | None = None) -> dict[str, Any]:
    import yaml

    path = Path(path) if path else DASHBOARD_FILE
    if not path.exists():
        raise FileNotFoundError(f"dashboard definition not found: {path}")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec.get("tabs"), list):
        raise ValueError(f"{path}: top level must have a 'tabs' list")
    return spec


def dashboard_model(spec: dict[str, Any], limits: dict[str, float], mc: MonitorConfig):
    """Build the Evidently dashboard (tabs of named panels) from the YAML spec.

    Each series ``value: <slice>.<metric>`` is the summary snapshot's ``MeanValue`` of that column, so a
    panel shows one point per run; ``{k}`` in a spec is replaced by ``monitor.exposure_k``.
    """
    from evidently.sdk.models import DashboardModel, DashboardTabModel, PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

    def sub(text: str | None) -> str | None:
        return text.replace("{k}", str(mc.exposure_k)) if isinstance(text, str) else text

    tabs, panels = [], []
    for tab in spec["tabs"]:
        ids = []
        for p in tab.get("panels", []):
            title, kind, size = sub(p["title"]), p.get("kind", "line"), p.get("size", "half")
            desc = sub(p.get("description"))
            if kind == "thresholds":
                lines = [f"{k} = {_fmt(v)}" for k, v in sorted(limits.items())]
                panel = text_panel(title, description=(desc + " " if desc else "") + "; ".join(lines), size=size)
            else:
                values = [PanelMetric(legend=sub(s.get("legend", s["value"])), tags=[SUMMARY_TAG],
                                      metric="evidently:metric_v2:MeanValue",
                                      metric_labels={"column": sub(s["value"])}) for s in p.get("series", [])]
                if kind == "line":
                    panel = line_plot_panel(title, values, description=desc, size=size)
                elif kind == "bar":
                    panel = bar_plot_panel(title, values, description=desc, size=size)
                elif kind == "counter":
                    panel = counter_panel(title, values, description=desc, size=size,
                                          aggregation=p.get("aggregation", "last"))
                elif kind == "text":
                    panel = text_panel(title, description=desc, size=size)
                else:
                    raise ValueError(f"dashboard panel {title!r}: unknown kind {kind!r}")
            panels.append(panel)
            ids.append(panel.id)
        tabs.append(DashboardTabModel(title=tab["title"], panels=ids))
    return DashboardModel(tabs=tabs, panels=panels)


# ==================================================================================================
# History of runs (values per run id; drives relative quality floors and snapshot replacement)
# ==================================================================================================
def history_path(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.reports("monitoring") / "history" / f"{dataset}.json"


def load_history(cfg: Settings, dataset: str) -> dict[str, Any]:
    path = history_path(cfg, dataset)
    return read_json(path) if path.exists() else {"runs": {}}


def previous_values(history: dict[str, Any], run_id: str) -> dict[str, float]:
    runs = [r for rid, r in history.get("runs", {}).items() if rid != run_id]
    return max(runs, key=lambda r: r.get("created", ""))["values"] if runs else {}


# ==================================================================================================
# Sections of a run
# ==================================================================================================
def _interactions_section(w: Windows, items: pd.DataFrame, mc: MonitorConfig, evaluate_section,
                          values: dict[str, float], thin: set[str]) -> None:
    cur = event_frame(w.current, items)
    ref = event_frame(_sample(w.reference, mc.max_reference_rows, mc.seed), items)
    n_warm = int(cur["log_popularity"].notna().sum())
    v = evaluate_section("interactions", interactions_report(mc, warm=n_warm > 0, drift=n_warm >= mc.min_rows),
                         cur, ref)
    values[f"{S.SLICE_COLD_START}.event_share"] = float(v["MeanValue(column=is_cold_start)"])
    cold_items = w.current.loc[cur["is_cold_start"].to_numpy(bool), S.ITEM_ID]
    values[f"{S.SLICE_COLD_START}.items"] = float(cold_items.nunique())
    for key, name in ((f"{S.SLICE_LONG_TAIL}.event_share", "MeanValue(column=is_long_tail)"),
                      (f"{S.SLICE_HEAD}.event_share", "MeanValue(column=is_head)"),
                      (f"{S.SLICE_ALL}.popularity_drift", _drift_name(v, "log_popularity"))):
        if name is not None and _finite(v.get(name)):
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
        name = _drift_name(v, col)
        if name is not None:
            values[f"{S.SLICE_ALL}.{key}"] = float(v[name])
    if len(cur) < mc.min_rows:
        thin.add(f"{SLICE_NEW_USERS}.user_share")
    return len(cur)


# ==================================================================================================
# Entry point
# ==================================================================================================
def run(cfg: Settings, dataset: str, current_start: str | None = None, current_end: str | None = None, *,
        run_id: str | None = None, run_date: str | None = None,
        embeddings: tuple[np.ndarray, np.ndarray] | None = None, fail_on_alert: bool = False) -> dict[str, Any]:
    """Monitor ``dataset``: reports, workspace snapshots and alerts (see the module docstring).

    ``current_start`` / ``current_end``: ISO times of the current window ``[start, end)`` (default: the
    temporal split's test window). ``run_id`` names the run (default: a new one); re-running an id replaces
    its outputs. ``run_date`` (``YYYY-MM-DD``, default today in UTC) names the report folder.
    ``embeddings`` = ``(item_ids, vectors)`` instead of the CEG store. With ``fail_on_alert`` a run with
    alerts raises :class:`MonitoringAlert` after writing everything.

    Returns ``{"dataset", "run_id", "alerts": [{slice, metric, value, threshold, kind, message}], "report"
    (HTML path), "summary" (JSON path), "values", "thresholds", "previous", "window", "sections", "notes",
    "workspace", "project_id", "snapshots"}``.
    """
    _evidently_env()
    from learn_tasks.data import datasets as data

    mc = cfg.monitor
    now = datetime.now(timezone.utc)
    run_id = run_id or f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    run_date = run_date or f"{now:%Y-%m-%d}"
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_date):
        raise ValueError(f"run_date must look like YYYY-MM-DD, got {run_date!r}")
    notes: list[str] = []

    split = data.load_split(cfg, dataset, S.PROTOCOL_TEMPORAL)
    w = windows(split, current_start, current_end)
    if w.reference.empty:
        raise ValueError(f"dataset {dataset!r}: no training events before {w.start}; nothing to compare with")
    all_items = np.union1d(data.load_items(cfg, dataset)[S.ITEM_ID].to_numpy(np.int64),
                           split[S.ITEM_ID].to_numpy(np.int64))
    items = item_table(w.reference, all_items, cfg.evaluate.tail_share)
    # Every snapshot of a run carries the same time, metadata and run name; its tag names the section.
    stamp = now.replace(tzinfo=None)  # the workspace compares naive UTC timestamps
    meta = {"dataset": dataset, "run_id": run_id, "run_date": run_date,
            "window": f"{w.start.isoformat()}/{w.end.isoformat()}"}

    def evaluate_section(section: str, report, cur: pd.DataFrame, ref: pd.DataFrame | None):
        snapshots[section] = report.run(_dataset(cur), None if ref is None else _dataset(ref), timestamp=stamp,
                                        tags=[section], metadata=dict(meta), name=f"{dataset} {section} {run_id}")
        return _values_of(snapshots[section])

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
        frames = _content_frames(cfg, dataset, w, items, embeddings, notes)
        if frames is not None:
            cur_e, ref_e = frames
            score = embedding_drift(cur_e, ref_e, mc)
            pc_cur, pc_ref = principal_components(cur_e.to_numpy(), ref_e.to_numpy(), mc.embedding_report_components)
            # the score beside the components; the catalogue against itself is 0.5 by definition
            pc_cur["embedding_drift"], pc_ref["embedding_drift"] = score, 0.5
            evaluate_section("content", content_report(list(pc_cur.columns[:-1])), pc_cur, pc_ref)
            values[f"{S.SLICE_COLD_START}.embedding_drift"] = score
            values[f"{S.SLICE_COLD_START}.items_encoded"] = float(len(cur_e))

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
              "current": [str(w.start), str(w.end)], "activity_reference": [str(w.recent_start), str(w.reference_end)]}
    result: dict[str, Any] = {
        "dataset": dataset, "run_id": run_id, "run_date": run_date, "created": now.isoformat(),
        "alerts": alerts, "report": str(out / "report.html"), "summary": str(out / "summary.json"),
        "values": values, "thresholds": limits, "previous": previous, "window": window,
        "sections": {name: str(out / f"{name}.html") for name in snapshots},
        "snapshot_files": {name: str(out / "snapshots" / f"{name}.json") for name in snapshots},
        "evaluation": str(eval_path) if eval_path else None, "notes": notes,
        "workspace": str(workspace_path(cfg)),
    }
    with atomic_dir(out) as tmp:
        (tmp / "snapshots").mkdir()
        for name, snap in snapshots.items():
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
    for a in alerts:
        log.warning("monitoring alert for %s: %s", dataset, a["message"])
    if fail_on_alert:
        raise_for_alerts(result)
    return result


def _drift_name(values: dict[str, Any], column: str) -> str | None:
    return next((k for k in values if k.startswith(f"ValueDrift(column={column},")), None)


# ==================================================================================================
# The top-level report page
# ==================================================================================================
def index_html(result: dict[str, Any]) -> str:
    """One page for on-call: alerts, every value against its threshold, notes, and the section reports."""
    e = html.escape
    limits, values, prev = result["thresholds"], result["values"], result.get("previous") or {}
    rows = []
    for key in sorted(values):
        lim = " ".join(f"{kind} {_fmt(limits[f'{key}.{kind}'])}" for kind in ("min", "max")
                       if f"{key}.{kind}" in limits)
        bad = any(f"{a['slice']}.{a['metric']}" == key for a in result["alerts"])
        rows.append(f"<tr class='{'bad' if bad else ''}'><td>{e(key)}</td><td>{_fmt(values[key])}</td>"
                    f"<td>{_fmt(prev[key]) if key in prev else ''}</td><td>{e(lim)}</td></tr>")
    alerts = "".join(f"<li>{e(a['message'])}</li>" for a in result["alerts"]) or "<li>none</li>"
    notes = "".join(f"<li>{e(n)}</li>" for n in result["notes"]) or "<li>none</li>"
    # The summary section is the table above (plus Evidently's tests); the others are embedded.
    sections = "".join(
        f"<h2>{e(name)}</h2><p><a href='{e(name)}.html'>open {e(name)}.html</a></p>"
        + (f"<iframe src='{e(name)}.html' title='{e(name)}' loading='lazy'></iframe>" if name != SUMMARY_TAG else
           "<p>Evidently's view of the values above, with each threshold as a test.</p>")
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


# ==================================================================================================
# Evidently UI over the local workspace
# ==================================================================================================
def ui_command(cfg: Settings, port: int | None = None, host: str | None = None) -> list[str]:
    """The argv that serves the Evidently UI over ``$LEARN_HOME/evidently`` (for process supervisors)."""
    import sys

    return [sys.executable, "-m", "evidently.cli", "ui", "--workspace", str(workspace_path(cfg).resolve()),
            "--host", host or cfg.monitor.ui_host, "--port", str(port or cfg.monitor.ui_port)]


def serve_ui(cfg: Settings, port: int | None = None, host: str | None = None) -> None:
    """Serve the Evidently UI (blocking) on loopback over the local workspace."""
    _evidently_env()
    from evidently.ui.service.app import run_local

    path = workspace_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    run_local(host=host or cfg.monitor.ui_host, port=port or cfg.monitor.ui_port, workspace=str(path.resolve()))


__all__: Sequence[str] = ("run", "raise_for_alerts", "MonitoringAlert", "check_thresholds", "thresholds", "rules",
                          "windows", "item_table", "event_frame", "user_frame", "eval_values", "latest_eval",
                          "open_project", "dashboard_model", "load_dashboard_spec", "serve_ui", "ui_command")
