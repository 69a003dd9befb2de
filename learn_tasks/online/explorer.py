"""The recommendation explorer: one page of the service for people, at ``<service>/explorer``.

Plain HTML and a little JavaScript (``learn_tasks/online/static/explorer.html``, no build step). Pick a user and
see what the model reads (the user's recent items from the online feature store, with titles) and what
the service answers (``GET /recommendations/{user_id}``: scores, cold-start and long-tail badges, and
the fallback strategy with its reason when one answered); add an item (``POST /items`` with the write
token) and see where it ranks for the user right after, i.e. that it became recommendable.

The page calls the service's own JSON API. This router adds only what a page needs and the API does not
give: which model serves (``/explorer/api/status``), users to pick from (``/explorer/api/users``) and a
user's history with titles (``/explorer/api/history/{user_id}``). Everything is read from the state the
service already keeps (``app.state.recommender``, a :class:`learn_tasks.online.recommender.Recommender`); while no
release is served (``app.state.live``, the service's :class:`learn_tasks.online.follow.ReleaseFollower`, says
why), the API answers 503 with the reason and the page shows it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse

from learn_tasks import schema as S
from learn_tasks.data import datasets as data

PAGE = Path(__file__).resolve().parent / "static" / "explorer.html"
INT64_MAX = 2**63 - 1

router = APIRouter(tags=["explorer"])

# Users per (home, dataset, interactions file version): counting events of a large log once per change.
_users_cache: dict[tuple[str, str], tuple[float, Any]] = {}
_users_lock = threading.Lock()


def _recommender(request: Request):
    """The service's recommender, or 503 with the reason no model is served yet."""
    rec = getattr(request.app.state, "recommender", None)
    if rec is None:
        live = getattr(request.app.state, "live", None)
        reason = getattr(live, "reason", None) or "the service has no model loaded"
        raise HTTPException(503, f"no model is served yet: {reason}")
    return rec


def user_activity(cfg, dataset: str):
    """Events per user of the prepared dataset (``pandas.Series`` indexed by user id, most active first)."""
    path = data.dataset_dir(cfg, dataset) / "interactions.parquet"
    key, stamp = (str(cfg.paths.home.resolve()), dataset), path.stat().st_mtime
    with _users_lock:
        hit = _users_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    users = pd.read_parquet(path, columns=[S.USER_ID])[S.USER_ID]
    counts = users.value_counts(sort=False).sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    with _users_lock:
        _users_cache[key] = (stamp, counts)
    return counts


def spread(n_total: int, n: int) -> list[int]:
    """``n`` positions spread evenly over ``range(n_total)`` (first and last included), for a sample of users
    from the most to the least active."""
    if n_total <= 0 or n <= 0:
        return []
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n)})


@router.get("/explorer", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/explorer/api/status", summary="Which model the service serves (or why none is)")
def explorer_status(request: Request) -> dict[str, Any]:
    rec = getattr(request.app.state, "recommender", None)
    live = getattr(request.app.state, "live", None)
    cfg = rec.cfg if rec is not None else getattr(live, "cfg", None)
    out: dict[str, Any] = {"ready": rec is not None, "reason": None,
                           "default_k": cfg.serve.default_k if cfg else 10, "max_k": cfg.serve.max_k if cfg else 200,
                           "token_env": cfg.serve.token_env if cfg else None}
    if rec is not None:
        out.update({"dataset": rec.dataset, "model_version": rec.bundle.version, "model_kind": rec.bundle.kind,
                    "collection": rec.collection, "search": rec.cfg.serve.search, "new_items": rec.new_items,
                    "catalogue_items": len(rec.titles) - rec.new_items})
    else:
        out.update({"dataset": getattr(live, "dataset", None),
                    "reason": getattr(live, "reason", None) or "the service has no model loaded"})
    if live is not None:
        out["live"] = live.describe()
    return out


@router.get("/explorer/api/users", summary="Users to explore: from the most to the least active")
def explorer_users(request: Request, limit: int = Query(40, ge=1, le=1000)) -> dict[str, Any]:
    rec = _recommender(request)
    try:
        counts = user_activity(rec.cfg, rec.dataset)
    except FileNotFoundError as exc:
        raise HTTPException(404, f"dataset {rec.dataset!r} has no interactions file: {exc}") from exc
    picked = [(int(counts.index[i]), int(counts.iloc[i])) for i in spread(len(counts), limit)]
    unknown = int(counts.index.max()) + 1 if len(counts) else 0
    return {"dataset": rec.dataset, "total_users": int(len(counts)),
            "users": [{S.USER_ID: u, "events": e} for u, e in picked],
            # An id no one has: the service answers it with its labelled fallback.
            "unknown_user": unknown if unknown <= INT64_MAX else None}


@router.get("/explorer/api/history/{user_id}", summary="A user's recent items (what the user tower reads), with titles")
def explorer_history(request: Request, user_id: int = PathParam(..., ge=0, le=INT64_MAX)) -> dict[str, Any]:
    rec = _recommender(request)
    feats = rec.online_features(user_id)
    recent = feats.get(S.RECENT_ITEM_IDS)
    items = [{S.ITEM_ID: int(i), S.TITLE: rec.titles.get(int(i)) or None, "readable": bool(rec.bundle.knows(int(i)))}
             for i in (recent or [])]
    return {S.USER_ID: int(user_id), "known": recent is not None, "items": items,  # oldest first
            "event_count": feats.get(S.EVENT_COUNT), "max_len": rec.bundle.max_len}
