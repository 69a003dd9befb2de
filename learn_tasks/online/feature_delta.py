"""Which online rows a feature rebuild changes (pure: Arrow tables in, a row mask out).

A rebuild after an increment recomputes the feature tables from the whole published history, but only
the entities the new data touched get different latest rows: users with new events, items whose
popularity or slice flags moved. ``features.materialize`` writes just those rows, which leaves the online
store with the same values as writing every row again (the row timestamps are processing time, not
features).

:func:`table_delta` does the same for whole feature tables (every row, by key): which rows of a rebuilt
table are new or different and which old keys are gone, so the PostgreSQL offline tables
(``offline_tables``) receive only those after an increment.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa


def _frame(table: pa.Table, key: str, columns: Sequence[str]) -> pd.DataFrame:
    df = table.select([key, *columns]).to_pandas()
    for col in columns:
        if pa.types.is_list(table.schema.field(col).type) or pa.types.is_large_list(table.schema.field(col).type):
            df[col] = [None if v is None else tuple(int(x) for x in v) for v in df[col]]
    return df


def changed_rows(new: pa.Table, old: pa.Table, key: str, columns: Sequence[str]) -> np.ndarray:
    """Mask over the rows of ``new`` (one per entity ``key``): the entity is absent from ``old`` or one of
    ``columns`` differs from its row there."""
    if not new.num_rows:
        return np.zeros(0, bool)
    cur = _frame(new, key, columns)
    before = _frame(old, key, columns).drop_duplicates(key, keep="last")
    merged = cur.merge(before, on=key, how="left", suffixes=("", "__old"), indicator=True)
    changed = (merged["_merge"] == "left_only").to_numpy()
    for col in columns:
        a, b = merged[col], merged[f"{col}__old"]
        same = np.fromiter(((x == y) or (pd.isna(x) if not isinstance(x, tuple) else False) and
                            (pd.isna(y) if not isinstance(y, tuple) else False)
                            for x, y in zip(a, b)), bool, len(merged))
        changed |= ~same
    return changed


def _as_int64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An int64, boolean or timestamp column as int64 numbers (timestamps: their integer ticks)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    return col.to_numpy(zero_copy_only=False).astype(np.int64)


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat int64 values) of a list column without nulls."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        raise ValueError("list column with nulls: the feature tables have none")
    col = col.cast(pa.large_list(col.type.value_type))
    return col.offsets.to_numpy().astype(np.int64), col.values.to_numpy(zero_copy_only=False).astype(np.int64)


def table_delta(new: pa.Table, old: pa.Table, keys: Sequence[str],
                values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """What turns table ``old`` into ``new``, both keyed by ``keys`` (unique), compared on ``values``.

    Returns ``(upsert, delete)``: a mask over ``new`` (key absent from ``old`` or a value differs) and a
    mask over ``old`` (key absent from ``new``). Exact and vectorised: list columns (int64 elements) are
    compared element by element, so a table of millions of rows takes a second or two, not a Python
    loop per row.
    """
    def key_frame(t: pa.Table) -> pd.DataFrame:
        return pd.DataFrame({k: _as_int64(t.column(k)) for k in keys})

    kn, ko = key_frame(new), key_frame(old)
    m = kn.assign(_i=np.arange(len(kn))).merge(ko.assign(_j=np.arange(len(ko))), on=list(keys), how="left")
    m = m.sort_values("_i", kind="stable")
    upsert = m["_j"].isna().to_numpy()
    i = m["_i"].to_numpy()[~upsert]
    j = m["_j"].to_numpy()[~upsert].astype(np.int64)
    differs = np.zeros(len(i), bool)
    for col in values:
        kind = new.schema.field(col).type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            (a_off, a_val), (b_off, b_val) = _list_parts(new.column(col)), _list_parts(old.column(col))
            a_len, b_len = np.diff(a_off)[i], np.diff(b_off)[j]
            differs |= a_len != b_len
            same = np.flatnonzero(a_len == b_len)
            n = a_len[same]
            rows = np.repeat(np.arange(len(same)), n)  # one entry per element to compare
            within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            unequal = a_val[a_off[i[same]][rows] + within] != b_val[b_off[j[same]][rows] + within]
            differs[same] |= np.bincount(rows, weights=unequal, minlength=len(same)) > 0
        else:
            differs |= _as_int64(new.column(col))[i] != _as_int64(old.column(col))[j]
    upsert[np.flatnonzero(~upsert)[differs]] = True
    present = ko.merge(kn.drop_duplicates(), on=list(keys), how="left", indicator=True)
    return upsert, (present["_merge"] == "left_only").to_numpy()
