"""Summary statistics of a prepared dataset (`learn data stats`): size, sequence lengths, time range and
the cold-start items and new users its temporal split produces."""
from __future__ import annotations

from typing import Any

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data.datasets import load_interactions, load_manifest
from learn_tasks.data.splits import load_split


def dataset_stats(cfg: Settings, name: str) -> dict[str, Any]:
    """The `learn data stats` report of dataset ``name`` (JSON-ready)."""
    manifest = load_manifest(cfg, name)
    inter = load_interactions(cfg, name)
    lengths = inter.groupby(S.USER_ID).size()
    q = [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    out: dict[str, Any] = {
        "dataset": name,
        "interactions": len(inter),
        "users": int(inter[S.USER_ID].nunique()),
        "items": int(manifest["items"]),
        "items_with_events": int(inter[S.ITEM_ID].nunique()),
        "quarantined": int(manifest["quarantined"]),
        "rows_read": int(manifest["rows_read"]),
        "sequence_length": {f"p{int(x * 100)}": float(lengths.quantile(x)) for x in q} | {"mean": float(lengths.mean())},
        "time_range": [str(inter[S.EVENT_TIMESTAMP].min()), str(inter[S.EVENT_TIMESTAMP].max())],
    }
    t = load_split(cfg, name, S.PROTOCOL_TEMPORAL)
    test = t[t[S.SPLIT] == S.TEST]
    before = t[t[S.SPLIT] != S.TEST]
    cold_items = set(test[S.ITEM_ID]) - set(before[S.ITEM_ID])
    new_users = set(test[S.USER_ID]) - set(before[S.USER_ID])
    out["temporal"] = {
        "test_cutoff": t.attrs.get("test_cutoff"), "valid_cutoff": t.attrs.get("valid_cutoff"),
        "test_events": len(test), "test_items": int(test[S.ITEM_ID].nunique()),
        "test_users": int(test[S.USER_ID].nunique()),
        "cold_start_item_share": len(cold_items) / max(test[S.ITEM_ID].nunique(), 1),
        "cold_start_event_share": float(test[S.ITEM_ID].isin(cold_items).mean()) if len(test) else 0.0,
        "new_user_share": len(new_users) / max(test[S.USER_ID].nunique(), 1),
    }
    out["cold_start_items"] = len(cold_items)
    out["new_users"] = len(new_users)
    return out
