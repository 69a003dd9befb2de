"""Live traffic: what the service answered and what users did, read from the durable log.

The offline sections of a monitoring run describe the temporal split; this one describes the last window of
real traffic (``[online_start, online_end)`` in log time, by default the ``monitor.online_window_h`` hours
before the run), from the two streams of :mod:`learn_tasks.data.eventlog`:

* ``served`` (one record per recommendation response, or a sample): strategy, item ids with cold-start /
  long-tail flags, latency;
* ``events`` (one record per accepted user event) and ``items`` (items added online).

Values (slice ``online``):

* ``requests``, ``events``: records in the window;
* ``fallback_share``: responses not answered by the personalized model (popular, content_based_seed);
* ``cold_start_exposure`` / ``long_tail_exposure``: share of the served item slots on cold-start /
  long-tail items (flags as the service stamped them);
* ``hit_rate``: share of responses with at least one served item that the same user consumed later in the
  window (an event logged after the response);
* ``new_items``, ``new_items_served``, ``new_item_first_impression_s_p50`` / ``_max``: items added online in
  the window, how many were served, and the time from an item's addition to the first response listing it;
* ``latency_ms_p50`` / ``_p95`` / ``_p99``: the service's own time per served response.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import eventlog
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.monitoring.rules import SLICE_ONLINE
STRATEGY_PERSONALIZED = "personalized"  # the strategy of the model's own answers (online.recommender)


@dataclass
class Traffic:
    served: pd.DataFrame
    events: pd.DataFrame
    items: pd.DataFrame
    start: pd.Timestamp
    end: pd.Timestamp


def traffic_window(cfg: Settings, dataset: str, start: Any = None, end: Any = None,
                   now: pd.Timestamp | None = None) -> Traffic:
    """The served records, events and online items logged in ``[start, end)`` (default: the last
    ``monitor.online_window_h`` hours before ``now``)."""
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    end_ts = S.to_utc(end) if end is not None else now + pd.Timedelta(seconds=1)
    start_ts = S.to_utc(start) if start is not None else end_ts - pd.Timedelta(hours=cfg.monitor.online_window_h)
    if end_ts <= start_ts:
        raise ValueError(f"online window is empty: end {end_ts} is not after start {start_ts}")
    log = open_log(cfg)
    try:
        served = log.read_window(dataset, eventlog.SERVED, start_ts, end_ts)
        events = log.read_window(dataset, eventlog.EVENTS, start_ts, end_ts)
        items = log.read_window(dataset, eventlog.ITEMS, start_ts, end_ts)
    finally:
        log.close()
    return Traffic(served, events, items, start_ts, end_ts)


def served_frame(t: Traffic) -> pd.DataFrame:
    """One row per served response: fallback flag, cold-start / long-tail shares of its items, whether
    the user consumed one of them later in the window (``hit``), latency."""
    s = t.served
    if s.empty:
        return pd.DataFrame(columns=["is_fallback", "cold_start_exposure", "long_tail_exposure", "hit", "latency_ms"])

    def share(flags: list) -> float:
        return float(np.mean(flags)) if len(flags) else np.nan

    hits = np.zeros(len(s), float)
    ev = t.events
    if not ev.empty:
        by_user = {u: g for u, g in ev[[S.USER_ID, S.ITEM_ID, "logged_at"]].groupby(S.USER_ID)}
        for r, (user, ids, at) in enumerate(zip(s[S.USER_ID], s["item_ids"], s["logged_at"])):
            g = by_user.get(user)
            if g is not None and ids:
                later = g.loc[g["logged_at"] > at, S.ITEM_ID]
                hits[r] = float(bool(np.isin(later.to_numpy(), ids).any()))
    return pd.DataFrame({
        "is_fallback": (s["strategy"] != STRATEGY_PERSONALIZED).to_numpy(float),
        "cold_start_exposure": [share(f) for f in s[S.IS_COLD_START]],
        "long_tail_exposure": [share(f) for f in s[S.IS_LONG_TAIL]],
        "hit": hits,
        "latency_ms": s["latency_ms"].to_numpy(float),
    })


def first_impressions(t: Traffic) -> pd.Series:
    """Seconds from each item added online in the window to the first served response listing it (NaN: not
    served yet), indexed by item id."""
    if t.items.empty:
        return pd.Series(dtype=float)
    added = t.items.drop_duplicates(S.ITEM_ID).set_index(S.ITEM_ID)["logged_at"]
    out = pd.Series(np.nan, index=added.index, dtype=float)
    if t.served.empty:
        return out
    slots = t.served[["item_ids", "logged_at"]].explode("item_ids").dropna()
    slots = slots[slots["item_ids"].astype("int64").isin(added.index)]
    if slots.empty:
        return out
    first = slots.groupby(slots["item_ids"].astype("int64"))["logged_at"].min()
    for item, at in first.items():
        out[item] = max(0.0, (at - added[item]).total_seconds())
    return out


def online_report():
    """The Evidently report of the served frame (no reference: the thresholds are absolute)."""
    from evidently import Report
    from evidently.metrics import MeanValue, QuantileValue, RowCount

    return Report([RowCount(), MeanValue(column="is_fallback"), MeanValue(column="cold_start_exposure"),
                   MeanValue(column="long_tail_exposure"), MeanValue(column="hit"),
                   QuantileValue(column="latency_ms", quantile=0.5), QuantileValue(column="latency_ms", quantile=0.95),
                   QuantileValue(column="latency_ms", quantile=0.99)])


def online_values(t: Traffic, report_values: dict[str, Any] | None) -> dict[str, float]:
    """``online.<metric>`` values of the window (see the module docstring); ``report_values`` are the
    online report's values (None when nothing was served)."""
    o = SLICE_ONLINE
    values = {f"{o}.requests": float(len(t.served)), f"{o}.events": float(len(t.events)),
              f"{o}.users": float(pd.concat([t.served[S.USER_ID], t.events[S.USER_ID]]).nunique())}
    if report_values:
        for key, name in (("fallback_share", "MeanValue(column=is_fallback)"),
                          ("cold_start_exposure", "MeanValue(column=cold_start_exposure)"),
                          ("long_tail_exposure", "MeanValue(column=long_tail_exposure)"),
                          ("hit_rate", "MeanValue(column=hit)"),
                          ("latency_ms_p50", "QuantileValue(column=latency_ms,quantile=0.5)"),
                          ("latency_ms_p95", "QuantileValue(column=latency_ms,quantile=0.95)"),
                          ("latency_ms_p99", "QuantileValue(column=latency_ms,quantile=0.99)")):
            v = report_values.get(name)
            if v is not None and np.isfinite(float(v)):
                values[f"{o}.{key}"] = float(v)
    tti = first_impressions(t)
    values[f"{o}.new_items"] = float(len(tti))
    served = tti.dropna()
    values[f"{o}.new_items_served"] = float(len(served))
    if len(served):
        values[f"{o}.new_item_first_impression_s_p50"] = float(served.median())
        values[f"{o}.new_item_first_impression_s_max"] = float(served.max())
    return values
