"""Which online rows a feature rebuild changes (pure: Arrow tables in, a row mask out).

A rebuild after an increment recomputes the feature tables from the whole published history, but only
the entities the new data touched get different latest rows: users with new events, items whose
popularity or slice flags moved. ``features.materialize`` writes just those rows, which leaves the online
store with the same values as writing every row again (the row timestamps are processing time, not
features).
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
