"""The rows of a Milvus item collection as column arrays (:class:`ItemRows`), and reading them back: by
ranges of item ids (:func:`fetch_ranges`) or with Milvus' query iterator (:func:`fetch_iterator`).
:func:`learn_tasks.online.index.fetch_all` chooses between them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from learn_tasks import schema as S

if TYPE_CHECKING:
    from pymilvus import MilvusClient

VECTOR = S.EMBEDDING
TITLE_MAX = 1024
SCALARS = (S.POPULARITY, S.FIRST_SEEN, S.IS_COLD_START, S.IS_LONG_TAIL, S.TITLE)
RANGE_ROWS_MAX = 16384  # Milvus' largest query result window: a range query that fills it may be cut short


@dataclass
class ItemRows:
    """Column arrays of the rows of a collection (one row per item)."""

    item_ids: np.ndarray  # [N] int64
    vectors: np.ndarray  # [N, D] float32, L2-normalised by the item tower
    popularity: np.ndarray | None = None  # [N] int64
    first_seen: np.ndarray | None = None  # [N] int64 epoch seconds, 0 = never
    is_cold_start: np.ndarray | None = None  # [N] bool
    is_long_tail: np.ndarray | None = None  # [N] bool
    titles: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        n = len(self.item_ids)
        if self.vectors.ndim != 2 or len(self.vectors) != n:
            raise ValueError(f"vectors must be [N={n}, D], got {self.vectors.shape}")
        if len(np.unique(self.item_ids)) != n:
            raise ValueError("item_ids contain duplicates")
        if not np.isfinite(self.vectors).all():
            bad = self.item_ids[~np.isfinite(self.vectors).all(axis=1)][:5].tolist()
            raise ValueError(f"non-finite vectors for item_ids {bad}")
        self.popularity = np.zeros(n, np.int64) if self.popularity is None else np.asarray(self.popularity, np.int64)
        self.first_seen = np.zeros(n, np.int64) if self.first_seen is None else np.asarray(self.first_seen, np.int64)
        self.is_cold_start = (self.popularity == 0) if self.is_cold_start is None else np.asarray(self.is_cold_start, bool)
        self.is_long_tail = np.zeros(n, bool) if self.is_long_tail is None else np.asarray(self.is_long_tail, bool)
        self.titles = [""] * n if self.titles is None else ["" if t is None or t != t else str(t)[:TITLE_MAX]
                                                           for t in self.titles]

    def __len__(self) -> int:
        return len(self.item_ids)

    def records(self, lo: int = 0, hi: int | None = None) -> list[dict[str, Any]]:
        hi = len(self) if hi is None else hi
        return [{S.ITEM_ID: int(self.item_ids[i]), VECTOR: self.vectors[i], S.POPULARITY: int(self.popularity[i]),
                 S.FIRST_SEEN: int(self.first_seen[i]), S.IS_COLD_START: bool(self.is_cold_start[i]),
                 S.IS_LONG_TAIL: bool(self.is_long_tail[i]), S.TITLE: self.titles[i]} for i in range(lo, hi)]


def fetch_ranges(client: "MilvusClient", target: str, ids: np.ndarray, per_range: int,
                 fields: list[str]) -> list[dict] | None:
    """Every row of the collection, read as the ranges ``(-inf, ids[k]), [ids[k], ids[2k]), ..., [ids[jk], +inf)``
    of ``ids`` (sorted) with ``k = per_range``, one query each; None when a range reaches the result limit (it
    may hold rows the query did not return) or the query fails (the iterator reads the collection then)."""
    from pymilvus.exceptions import MilvusException
    per_range = max(1, min(per_range, RANGE_ROWS_MAX // 2))  # room for rows the caller did not expect
    cuts = ids[per_range::per_range].tolist()
    bounds = list(zip([None, *cuts], [*cuts, None]))
    recs: list[dict] = []
    for lo, hi in bounds:
        terms = [f"{S.ITEM_ID} >= {lo}" if lo is not None else None, f"{S.ITEM_ID} < {hi}" if hi is not None else None]
        expr = " and ".join(t for t in terms if t) or f"{S.ITEM_ID} >= {np.iinfo(np.int64).min}"
        try:
            got = client.query(target, filter=expr, output_fields=fields)
        except MilvusException:  # e.g. a range over Milvus' result size (rows added above the last cut)
            return None
        if len(got) >= RANGE_ROWS_MAX:
            return None
        recs.extend(got)
    return recs


def fetch_iterator(client: "MilvusClient", target: str, batch: int, fields: list[str]) -> list[dict]:
    """Every row of the collection through Milvus' query iterator, ``batch`` rows a call."""
    it = client.query_iterator(target, batch_size=batch, filter=f"{S.ITEM_ID} >= {np.iinfo(np.int64).min}",
                               output_fields=fields)
    recs: list[dict] = []
    try:
        while True:
            chunk = it.next()
            if not chunk:
                break
            recs.extend(chunk)
    finally:
        it.close()
    return recs


def item_rows(recs: list[dict], vectors_only: bool) -> ItemRows:
    """Query results -> :class:`ItemRows` sorted by item id (``vectors_only``: the other columns get defaults)."""
    recs.sort(key=lambda r: r[S.ITEM_ID])
    dim = len(recs[0][VECTOR]) if recs else 0
    if vectors_only:
        return ItemRows(item_ids=np.array([r[S.ITEM_ID] for r in recs], np.int64),
                        vectors=np.array([r[VECTOR] for r in recs], np.float32).reshape(len(recs), dim))
    return ItemRows(item_ids=np.array([r[S.ITEM_ID] for r in recs], np.int64),
                    vectors=np.array([r[VECTOR] for r in recs], np.float32).reshape(len(recs), dim),
                    popularity=np.array([r[S.POPULARITY] for r in recs], np.int64),
                    first_seen=np.array([r[S.FIRST_SEEN] for r in recs], np.int64),
                    is_cold_start=np.array([r[S.IS_COLD_START] for r in recs], bool),
                    is_long_tail=np.array([r[S.IS_LONG_TAIL] for r in recs], bool),
                    titles=[r[S.TITLE] for r in recs])

