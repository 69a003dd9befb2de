"""The Evidently workspace, its dashboard, the history of monitoring runs and the Evidently UI.

* Workspace ``$LEARN_HOME/evidently/`` (``cfg.paths.evidently()``): one project per dataset
  (``monitor.project``), one snapshot per section of each run.
* Dashboard: tabs of panels defined in ``monitoring/dashboard.yaml`` (:func:`load_dashboard_spec`), built into
  an Evidently ``DashboardModel`` over the summary snapshots (:func:`dashboard_model`).
* History ``reports/monitoring/history/<dataset>.json``: values per run id; it drives the relative quality
  floors and the replacement of a re-run's snapshots.
* The UI: :func:`ui_command` (argv for process supervisors) and :func:`serve_ui` (blocking).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from learn_tasks import artifacts
from learn_tasks.config import REPO_ROOT, MonitorConfig, Settings
from learn_tasks.monitoring.reports import SUMMARY_TAG, evidently_env
from learn_tasks.monitoring.rules import fmt
from learn_tasks.storage import read_json

DASHBOARD_FILE = REPO_ROOT / "monitoring" / "dashboard.yaml"


# ==================================================================================================
# Workspace and dashboard
# ==================================================================================================
def project_name(cfg: Settings, dataset: str) -> str:
    return cfg.monitor.project.format(dataset=dataset)


def open_project(cfg: Settings, dataset: str):
    """(workspace, project) for ``dataset``, creating the project on first use."""
    evidently_env()
    from evidently.ui.workspace import Workspace

    path = cfg.paths.evidently()
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
    """The dashboard definition (default ``monitoring/dashboard.yaml``): ``{"tabs": [{title, panels}]}``."""
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
                lines = [f"{k} = {fmt(v)}" for k, v in sorted(limits.items())]
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
    """The history of monitoring runs (under a URL home the published one, which every host writes)."""
    path = history_path(cfg, dataset)
    artifacts.fetch_file(cfg, path)
    return read_json(path) if path.exists() else {"runs": {}}


def previous_values(history: dict[str, Any], run_id: str) -> dict[str, float]:
    """The values of the newest run in ``history`` other than ``run_id`` ({} when there is none)."""
    runs = [r for rid, r in history.get("runs", {}).items() if rid != run_id]
    return max(runs, key=lambda r: r.get("created", ""))["values"] if runs else {}


# ==================================================================================================
# Evidently UI over the local workspace
# ==================================================================================================
def ui_command(cfg: Settings, port: int | None = None, host: str | None = None) -> list[str]:
    """The argv that serves the Evidently UI over ``$LEARN_HOME/evidently`` (for process supervisors)."""
    return [sys.executable, "-m", "evidently.cli", "ui", "--workspace", str(cfg.paths.evidently().resolve()),
            "--host", host or cfg.monitor.ui_host, "--port", str(port or cfg.monitor.ui_port)]


def serve_ui(cfg: Settings, port: int | None = None, host: str | None = None) -> None:
    """Serve the Evidently UI (blocking) on loopback over the local workspace."""
    evidently_env()
    from evidently.ui.service.app import run_local

    path = cfg.paths.evidently()
    path.mkdir(parents=True, exist_ok=True)
    run_local(host=host or cfg.monitor.ui_host, port=port or cfg.monitor.ui_port, workspace=str(path.resolve()))
