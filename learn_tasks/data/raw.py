"""Raw frames: interaction and item tables as the source wrote them, ready for validation.

A raw frame has the canonical column names with every value kept as text (``None`` when empty), plus
``_file``/``_line`` provenance so a rejected row can be traced to its source line. :func:`raw_from_frame`,
:func:`read_raw_file` and :func:`read_raw_files` build them from DataFrames, CSV or Parquet files;
:func:`interaction_frame` / :func:`item_frame` add the parsed and derived columns the Great Expectations
suites of :mod:`learn_tasks.data.validation` read; :func:`typed_interactions` / :func:`typed_items` turn
accepted rows back into canonical dtypes for publishing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.data.readers import DataError

# Provenance columns carried by raw frames (never validated, never published).
FILE_COL, LINE_COL = "_file", "_line"
INTERACTION_RAW_COLUMNS = (S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP, S.RATING, S.EVENT_TYPE)
ITEM_RAW_COLUMNS = tuple(S.ITEM_COLUMNS)

# Derived columns the suites read (documented in the Data Docs through each expectation's meta).
EVENT_TIME = "event_time"  # parsed event_timestamp (UTC), NaT when it does not parse
RATING_VALUE = "rating_value"  # parsed rating, NaN when absent or malformed
PRICE_VALUE = "price_value"
ITEM_IN_CATALOGUE = "item_in_catalogue"  # True/False, None when item_id itself is malformed
DUPLICATE_RANK = "duplicate_rank"  # 1 for the first copy of a key in the batch, 2.. for later copies
TEXT_CHARS = "text_chars"  # total characters of the item's text fields

# Values meaning "no value" in text sources.
NULL_TOKENS = frozenset({"", "nan", "NaN", "NAN", "None", "none", "null", "NULL", "NaT", "nat", "<NA>", "N/A"})


# --------------------------------------------------------------------------------------------------
# Raw frames
# --------------------------------------------------------------------------------------------------
def _as_text(s: pd.Series, id_like: bool = False) -> pd.Series:
    """One column as text as a person would read it (object dtype); null tokens become None.

    Typed columns (Parquet) take direct paths: converting half a million values through pandas'
    string dtype or Timestamp objects costs seconds per column.
    """
    if pd.api.types.is_datetime64_any_dtype(s):
        # Unix seconds (what the timestamp check and parser accept); sub-second times keep ISO form.
        unit = getattr(s.dt, "unit", "ns")
        per_s = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
        ticks = s.astype("int64").to_numpy()
        missing = s.isna().to_numpy()
        if (ticks[~missing] % per_s == 0).all():
            out = [str(v) for v in (ticks // per_s).tolist()]
        else:
            out = s.astype("string").tolist()
        return _with_nulls(out, missing, s.index)
    if pd.api.types.is_bool_dtype(s) or (pd.api.types.is_integer_dtype(s) and s.notna().all()):
        return pd.Series([str(v) for v in s.tolist()], index=s.index, dtype=object)
    if pd.api.types.is_float_dtype(s):
        values = s.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(values)
        out = [repr(v) for v in values.tolist()]
        if id_like:
            # Parquet writers turn an integer column with a missing value into float: 5.0 means id 5.
            integral = np.flatnonzero(np.isfinite(values) & (np.mod(np.nan_to_num(values), 1) == 0))
            for i, v in zip(integral.tolist(), values[integral].astype("int64").tolist()):
                out[i] = str(v)
        return _with_nulls(out, missing, s.index)
    values = s.astype("string").str.strip().tolist()
    out = [None if (v is pd.NA or v is None or v in NULL_TOKENS) else v for v in values]
    return pd.Series(out, index=s.index, dtype=object)


def _with_nulls(values: list, missing: np.ndarray, index: pd.Index) -> pd.Series:
    for i in np.flatnonzero(missing).tolist():
        values[i] = None
    return pd.Series(values, index=index, dtype=object)


def raw_from_frame(df: pd.DataFrame, kind: str, file: str | Path, first_line: int = 1) -> pd.DataFrame:
    """A raw frame (text values + provenance) from any DataFrame with canonical column names.

    ``kind`` is ``"interactions"`` or ``"items"``; a missing required column is an error naming the
    file; missing optional columns become empty. ``first_line`` is the source line of the first row
    (2 for a CSV with a header) so quarantine records point at the right line.
    """
    columns, required = _spec(kind)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(file, f"missing column(s) {missing}; columns are {list(df.columns)}")
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for col in columns:
        if col in df.columns:
            out[col] = _as_text(df[col].reset_index(drop=True), id_like=col in (S.USER_ID, S.ITEM_ID))
        else:
            out[col] = pd.Series([None] * len(df), dtype=object)
    if FILE_COL in df.columns and LINE_COL in df.columns:  # already has provenance: keep it
        out[FILE_COL] = df[FILE_COL].to_numpy()
        out[LINE_COL] = df[LINE_COL].to_numpy(dtype=np.int64)
    else:
        out[FILE_COL] = str(file)
        out[LINE_COL] = np.arange(first_line, first_line + len(df), dtype=np.int64)
    return out


def read_raw_file(path: str | Path, kind: str) -> pd.DataFrame:
    """Read one CSV (every value as text) or Parquet file into a raw frame."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if path.suffix == ".parquet":
        return raw_from_frame(pd.read_parquet(path), kind, path, first_line=1)
    if path.suffix in (".csv", ".gz"):
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="error")
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(path, f"malformed CSV: {exc}") from exc
        return raw_from_frame(df, kind, path, first_line=2)
    raise DataError(path, "unsupported file type (use .csv or .parquet)")


def read_raw_files(paths: Iterable[str | Path], kind: str) -> pd.DataFrame:
    """Several files of one kind as one raw frame (in path order; an empty raw frame when none)."""
    frames = [read_raw_file(p, kind) for p in sorted(map(Path, paths))]
    if not frames:
        return empty_raw(kind)
    return pd.concat(frames, ignore_index=True)


def empty_raw(kind: str) -> pd.DataFrame:
    """A raw frame of ``kind`` with no rows."""
    columns, _ = _spec(kind)
    out = pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    out[FILE_COL] = pd.Series([], dtype=object)
    out[LINE_COL] = pd.Series([], dtype=np.int64)
    return out


def _spec(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if kind == "interactions":
        return INTERACTION_RAW_COLUMNS, S.INTERACTION_REQUIRED
    if kind == "items":
        return ITEM_RAW_COLUMNS, S.ITEM_REQUIRED
    raise ValueError(f"kind must be 'interactions' or 'items', not {kind!r}")


# --------------------------------------------------------------------------------------------------
# Parsed and derived columns
# --------------------------------------------------------------------------------------------------
def parse_timestamps(raw: pd.Series) -> pd.Series:
    """Unix seconds or ISO 8601 text -> UTC timestamps (NaT when neither parses)."""
    raw = raw.astype(object)
    num = pd.to_numeric(raw, errors="coerce")
    out = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[us, UTC]")
    is_num = num.notna() & num.abs().lt(1e11)
    if is_num.any():
        out[is_num] = pd.to_datetime(num[is_num], unit="s", utc=True).astype("datetime64[us, UTC]")
    rest = raw.notna() & num.isna()
    if rest.any():
        parsed = pd.to_datetime(raw[rest].astype(str), utc=True, errors="coerce", format="ISO8601")
        out[rest] = parsed.astype("datetime64[us, UTC]")
    return out


def _ids(raw: pd.Series) -> pd.Series:
    """Text ids -> float64 ids (NaN when not a non-negative integer; float keeps NaN cheaply).

    Deliberately lenient ("1e3" parses): the id-format expectation quarantines such rows anyway;
    this parse only feeds the derived duplicate and catalogue columns.
    """
    num = pd.to_numeric(raw, errors="coerce").astype("float64")
    return num.where((num >= 0) & (num % 1 == 0) & (num < 2**63))


def _numbers(raw: pd.Series) -> pd.Series:
    """Text numbers -> float64 (NaN when absent or not finite)."""
    num = pd.to_numeric(raw, errors="coerce").astype("float64")
    return num.where(np.isfinite(num))


def _rank(keys: pd.DataFrame, valid: pd.Series) -> pd.Series:
    """1 for the first row of each key, 2, 3... for later copies; NaN where the key is not valid."""
    rank = pd.Series(np.nan, index=keys.index, dtype="float64")
    if valid.any():
        sub = keys[valid]
        rank[valid] = (sub.groupby(list(sub.columns), sort=False).cumcount() + 1).astype("float64")
    return rank


def interaction_frame(raw: pd.DataFrame, catalogue_ids: np.ndarray | pd.Series | None) -> pd.DataFrame:
    """The frame the interaction suite reads: raw text columns + parsed and derived columns.

    ``catalogue_ids`` are the item ids events may refer to (None: skip the unknown-item check by
    marking every parsable id as known).
    """
    df = raw.reset_index(drop=True).copy()
    uid, iid = _ids(df[S.USER_ID]), _ids(df[S.ITEM_ID])
    df[EVENT_TIME] = parse_timestamps(df[S.EVENT_TIMESTAMP])
    df[RATING_VALUE] = _numbers(df[S.RATING])
    known = pd.Series(None, index=df.index, dtype=object)
    has_item = iid.notna()
    if catalogue_ids is None:
        known[has_item] = True
    else:
        cat = np.asarray(catalogue_ids, dtype=np.int64)
        known[has_item] = np.isin(iid[has_item].to_numpy(dtype=np.int64), cat)
    df[ITEM_IN_CATALOGUE] = known
    keys = pd.DataFrame({"u": uid, "i": iid, "t": df[EVENT_TIME]})
    df[DUPLICATE_RANK] = _rank(keys, uid.notna() & iid.notna() & df[EVENT_TIME].notna())
    return df


def item_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """The frame the item suite reads: raw text columns + parsed price, text length, duplicate rank."""
    df = raw.reset_index(drop=True).copy()
    iid = _ids(df[S.ITEM_ID])
    df[PRICE_VALUE] = _numbers(df[S.PRICE])
    lengths = [df[c].astype("string").str.len().fillna(0).astype("int64") for c in S.ITEM_TEXT_FIELDS]
    df[TEXT_CHARS] = np.sum(lengths, axis=0).astype("int64") if lengths else 0
    df[DUPLICATE_RANK] = _rank(pd.DataFrame({"i": iid}), iid.notna())
    return df



# --------------------------------------------------------------------------------------------------
# Typed frames for publishing accepted rows
# --------------------------------------------------------------------------------------------------
def typed_interactions(raw: pd.DataFrame) -> pd.DataFrame:
    """Accepted raw interaction rows -> canonical dtypes (every value already passed its check)."""
    out = pd.DataFrame({
        S.USER_ID: pd.to_numeric(raw[S.USER_ID]).astype("int64"),
        S.ITEM_ID: pd.to_numeric(raw[S.ITEM_ID]).astype("int64"),
        S.EVENT_TIMESTAMP: parse_timestamps(raw[S.EVENT_TIMESTAMP]),
        S.RATING: _numbers(raw[S.RATING]),
        S.EVENT_TYPE: raw[S.EVENT_TYPE].astype("string"),
    })
    return out.astype(S.INTERACTION_COLUMNS)


def typed_items(raw: pd.DataFrame) -> pd.DataFrame:
    """Accepted raw item rows -> canonical dtypes."""
    out = pd.DataFrame({c: raw[c].astype("string") for c in S.ITEM_COLUMNS})
    out[S.ITEM_ID] = pd.to_numeric(raw[S.ITEM_ID]).astype("int64")
    out[S.PRICE] = _numbers(raw[S.PRICE])
    return out.astype(S.ITEM_COLUMNS)


# --------------------------------------------------------------------------------------------------
# Batch files
# --------------------------------------------------------------------------------------------------
def find_batch_files(path: Path) -> tuple[list[Path], list[Path]]:
    """Interaction and item files in a folder (or one file), by name: ``interactions*`` / ``items*``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix in (".csv", ".parquet") and not p.name.startswith(".")]
    inter = [p for p in files if p.name.startswith(("interactions", "events")) or p.parent.name == "interactions"]
    items = [p for p in files if p not in inter and (p.name.startswith("items") or p.parent.name == "items")]
    return inter, items
