"""Alert rules: thresholds from ``cfg.monitor`` -> alerts ``{slice, metric, value, threshold, kind, message}``.

Pure functions (no I/O). Each rule names a ``<slice>.<metric>`` value, whether it alerts above (``max``) or
below (``min``) its threshold, and the :class:`MonitorConfig` field holding that threshold (``None`` there
switches the rule off; see ``monitoring/thresholds.md``). Quality floors are relative to the previous run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from learn_tasks import schema as S
from learn_tasks.config import MonitorConfig

SLICE_NEW_USERS = "new_users"  # users with no training event (a subset of schema.SLICE_COLD_USERS)
SLICE_ONLINE = "online"  # live traffic from the served and event logs (learn_tasks.monitoring.online)


class MonitoringAlert(RuntimeError):
    """Raised by :func:`raise_for_alerts` (and ``monitor_window(..., fail_on_alert=True)``); carries the alerts."""

    def __init__(self, alerts: list[dict[str, Any]], report: str | None = None):
        self.alerts, self.report = alerts, report
        lines = [a["message"] for a in alerts]
        super().__init__(f"{len(alerts)} monitoring alert(s): " + "; ".join(lines)
                         + (f" (report: {report})" if report else ""))


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
        Rule(SLICE_ONLINE, "fallback_share", "max", "online_fallback_share_max"),
        Rule(SLICE_ONLINE, "latency_ms_p99", "max", "online_latency_p99_ms_max"),
        Rule(SLICE_ONLINE, "new_item_first_impression_s_max", "max", "online_new_item_first_impression_s_max"),
        Rule(SLICE_ONLINE, "hit_rate", "min", "online_hit_rate_min"),
        Rule(SLICE_ONLINE, "cold_start_exposure", "min", "online_cold_start_exposure_min"),
        Rule(SLICE_ONLINE, "long_tail_exposure", "min", "online_long_tail_exposure_min"),
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
            if metric in mc.quality_metrics and slc in S.SLICES and finite(prev) and prev > 0:
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
        if not finite(value):
            continue
        crossed = value > limit if kind == "max" else value < limit
        if not crossed:
            continue
        slc, metric = key.split(".", 1)
        where = "above" if kind == "max" else "below"
        if tkey in fields:
            why = f"monitor.{fields[tkey]} = {fmt(limit)}"
        else:  # a relative quality floor
            prev = (previous or {}).get(key)
            drop = mc.quality_drop_max if mc is not None else None
            why = f"previous run {fmt(prev)}, monitor.quality_drop_max = {drop}"
        alerts.append({
            "slice": slc, "metric": metric, "value": float(value), "threshold": float(limit), "kind": kind,
            "message": f"slice {slc}: {metric} = {fmt(value)} is {where} the threshold {fmt(limit)} ({why})",
        })
    return alerts


def raise_for_alerts(result: dict[str, Any]) -> dict[str, Any]:
    """Raise :class:`MonitoringAlert` when a ``monitor_window`` result has alerts; return it unchanged otherwise."""
    if result.get("alerts"):
        raise MonitoringAlert(result["alerts"], result.get("report"))
    return result


def finite(x: Any) -> bool:
    """True for a finite int or float (numpy scalars included); False for None, NaN, inf and non-numbers."""
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def fmt(x: Any) -> str:
    """A value as alerts and pages show it: integers without a decimal point, else 4 significant digits."""
    if not finite(x):
        return str(x)
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.4g}"
