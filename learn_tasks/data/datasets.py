"""Data layer: readers from public formats into canonical Parquet, fetching, splits and statistics.

Every reader streams its input (CSV in row batches, JSON lines one at a time) and sorts rows into
*kept* or *quarantined*: a row that cannot be parsed is written to ``quarantine.parquet`` with the
file, line, field and reason, so ``rows read = rows kept + rows quarantined`` always holds. Problems
with a whole file (missing, empty, missing column) raise :class:`DataError` naming the file.

Splits:

* ``loo``  leave-one-out per user in time order (last event test, second-to-last validation), the
  protocol of the HSTU and LEARN papers' Amazon Books tables;
* ``temporal`` a global cut-off: events after it are test, so items first seen after it are genuinely
  cold-start and users first seen after it are new users.
"""
from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import html
import io
import json
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import REPO_ROOT, Settings
from learn_tasks.storage import read_json, write_json, write_parquet

FORMATS = ("seqrec", "amazon2014", "movielens", "canonical")
_SURROGATE = re.compile("[\udc80-\udcff]")
# Unix seconds outside [1970, 2100) are treated as corrupt rather than converted.
_TS_MIN, _TS_MAX = 0, 4_102_444_800


class DataError(ValueError):
    """A problem with a whole input (or a row where the stage cannot continue), with its location."""

    def __init__(self, file: str | Path, message: str, line: int | None = None, field: str | None = None):
        where = str(file) + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.file, self.line, self.field = str(file), line, field


# --------------------------------------------------------------------------------------------------
# Quarantine and prepared-dataset containers
# --------------------------------------------------------------------------------------------------
@dataclass
class Quarantine:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, file: str | Path, line: int, fld: str, reason: str, raw: str) -> None:
        self.rows.append({S.QUARANTINE_FILE: str(file), S.QUARANTINE_LINE: int(line), S.QUARANTINE_FIELD: fld,
                          S.QUARANTINE_REASON: reason, S.QUARANTINE_RAW: raw})

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=list(S.QUARANTINE_COLUMNS))
        return df.astype(S.QUARANTINE_COLUMNS)


@dataclass
class Prepared:
    interactions: pd.DataFrame
    items: pd.DataFrame
    quarantine: Quarantine
    rows_read: int
    users: pd.DataFrame | None = None  # id map when the source has string user ids


# --------------------------------------------------------------------------------------------------
# Streaming CSV with row-level quarantine
# --------------------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    """Open as UTF-8; undecodable bytes become lone surrogates so the row can be quarantined."""
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _check_nonempty(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")


def stream_csv(
    path: Path, columns: list[str], q: Quarantine, header: bool = True, chunk_rows: int = 200_000,
    optional: Iterable[str] = (),
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Yield (string DataFrame with ``columns``, 1-based line numbers) batches of well-formed rows.

    Rows with the wrong number of fields or non-UTF-8 bytes go to quarantine. With ``header`` the
    header must name every required column (extra columns are ignored; ``optional`` may be absent).
    """
    _check_nonempty(path)
    optional = set(optional)
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        if header:
            try:
                head = next(reader)
            except StopIteration:
                raise DataError(path, "file is empty") from None
            head = [h.strip().lstrip("\ufeff") for h in head]
            missing = [c for c in columns if c not in head and c not in optional]
            if missing:
                raise DataError(path, f"missing column(s) {missing}; header is {head}", line=1)
            pos = [head.index(c) if c in head else -1 for c in columns]
            width = len(head)
        else:
            pos, width = list(range(len(columns))), len(columns)
        identity = pos == list(range(width))
        rows: list[list[str]] = []
        lines: list[int] = []
        seen_any = False
        try:
            for row in reader:
                seen_any = True
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line: nothing to keep or lose
                if len(row) != width:
                    q.add(path, line, "*", f"expected {width} fields, got {len(row)}", ",".join(row))
                    continue
                text = ",".join(row) if not all(map(str.isascii, row)) else ""
                if text and _SURROGATE.search(text):
                    q.add(path, line, "*", "non-UTF-8 bytes", text.encode("utf-8", "backslashreplace").decode())
                    continue
                rows.append(row if identity else [row[p] if p >= 0 else "" for p in pos])
                lines.append(line)
                if len(rows) >= chunk_rows:
                    yield pd.DataFrame(rows, columns=columns, dtype=object), np.asarray(lines)
                    rows, lines = [], []
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV: {exc}", line=reader.line_num) from exc
        if not seen_any and header:
            raise DataError(path, "file has a header but no rows")
        if rows:
            yield pd.DataFrame(rows, columns=columns, dtype=object), np.asarray(lines)


def _coerce(
    df: pd.DataFrame, lines: np.ndarray, path: Path, q: Quarantine, spec: dict[str, str]
) -> pd.DataFrame:
    """Convert string columns by ``spec`` (int | float | float? | ts | str | str?); quarantine failures.

    ``?`` marks a column that may be empty. ``ts`` is unix seconds.
    """
    bad = np.zeros(len(df), dtype=bool)
    reason = np.full(len(df), "", dtype=object)
    out: dict[str, Any] = {}
    for col, kind in spec.items():
        s = df[col].str.strip() if kind.rstrip("?") == "str" else df[col]
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        empty = (s.isna() | (s == "")).to_numpy()
        if kind == "str":
            vals = s.where(~empty, None)
            this_bad = empty & (not optional)
            out[col] = vals
            msg = "empty value"
        else:
            num = pd.to_numeric(s.where(~empty, None), errors="coerce")
            this_bad = num.isna().to_numpy() & (~empty | (not optional))
            msg = "not a number" if kind != "int" else "not an integer"
            if kind == "int":
                frac = num.notna().to_numpy() & ((num % 1) != 0).fillna(False).to_numpy()
                this_bad |= frac
            if kind == "ts":
                rng = num.notna().to_numpy() & ~num.between(_TS_MIN, _TS_MAX).fillna(False).to_numpy()
                this_bad |= rng
                msg = "not a unix timestamp in [1970, 2100)"
            if kind == "float":
                this_bad |= num.notna().to_numpy() & ~np.isfinite(num.fillna(0).to_numpy(dtype=float))
            out[col] = num
            if kind == "int" and not optional:
                msg = msg if not empty.any() else "empty or not an integer"
        new = this_bad & ~bad
        reason[new] = [f"{col}\t{msg}"] * int(new.sum())
        bad |= this_bad
    for i in np.flatnonzero(bad):
        fld, msg = reason[i].split("\t")
        q.add(path, int(lines[i]), fld, msg, ",".join("" if pd.isna(v) else str(v) for v in df.iloc[i].tolist()))
    keep = ~bad
    res = pd.DataFrame({c: v[keep] if isinstance(v, np.ndarray) else v[keep].reset_index(drop=True)
                        for c, v in out.items()})
    for col, kind in spec.items():
        k = kind.rstrip("?")
        if k in ("int",):
            res[col] = res[col].astype("int64")
        elif k == "ts":
            res[col] = pd.to_datetime(res[col].astype("int64"), unit="s", utc=True).astype(
                S.INTERACTION_COLUMNS[S.EVENT_TIMESTAMP])
        elif k == "float":
            res[col] = res[col].astype("float64")
    return res


def _unescape(s: pd.Series) -> pd.Series:
    return s.map(lambda v: html.unescape(v).strip() if isinstance(v, str) else v)


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def read_seqrec(input_dir: Path, cfg: Settings) -> Prepared:
    """SeqRec-benchmark CSV pair: interactions.csv (user_id,item_id,timestamp), items.csv (item_id,title)."""
    q = Quarantine()
    inter_path, items_path = input_dir / "interactions.csv", input_dir / "items.csv"
    parts, n_read = [], 0
    for df, lines in stream_csv(inter_path, ["user_id", "item_id", "timestamp"], q, chunk_rows=cfg.data.chunk_rows):
        n_read += len(df)
        parts.append(_coerce(df, lines, inter_path, q, {"user_id": "int", "item_id": "int", "timestamp": "ts"}))
    inter = pd.concat(parts, ignore_index=True).rename(columns={"timestamp": S.EVENT_TIMESTAMP})
    n_read += sum(1 for r in q.rows if r[S.QUARANTINE_FILE] == str(inter_path) and r[S.QUARANTINE_FIELD] == "*")
    items, n_items_read = _read_item_csv(items_path, {"item_id": "int", "title": "str?"}, q, cfg)
    return Prepared(inter, items, q, n_read + n_items_read)


def _read_item_csv(path: Path, spec: dict[str, str], q: Quarantine, cfg: Settings,
                   rename: dict[str, str] | None = None) -> tuple[pd.DataFrame, int]:
    before = len(q)
    parts, n = [], 0
    for df, lines in stream_csv(path, list(spec), q, chunk_rows=cfg.data.chunk_rows):
        n += len(df)
        parts.append(_coerce(df, lines, path, q, spec))
    n += sum(1 for r in q.rows[before:] if r[S.QUARANTINE_FIELD] == "*")
    items = pd.concat(parts, ignore_index=True).rename(columns=rename or {})
    items = items.rename(columns={"movieId": S.ITEM_ID})
    if S.TITLE in items:
        items[S.TITLE] = _unescape(items[S.TITLE])
    return items, n


def read_movielens(input_dir: Path, cfg: Settings) -> Prepared:
    """MovieLens ratings.csv + movies.csv (+ tags.csv, folded into each movie's attributes)."""
    q = Quarantine()
    rpath = input_dir / "ratings.csv"
    parts, n_read = [], 0
    before = len(q)
    for df, lines in stream_csv(rpath, ["userId", "movieId", "rating", "timestamp"], q, chunk_rows=cfg.data.chunk_rows):
        n_read += len(df)
        parts.append(_coerce(df, lines, rpath, q, {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "ts"}))
    n_read += sum(1 for r in q.rows[before:] if r[S.QUARANTINE_FIELD] == "*")
    inter = pd.concat(parts, ignore_index=True).rename(
        columns={"userId": S.USER_ID, "movieId": S.ITEM_ID, "timestamp": S.EVENT_TIMESTAMP, "rating": S.RATING})
    inter[S.EVENT_TYPE] = pd.array(["rating"] * len(inter), dtype="string")

    items, n_items = _read_item_csv(input_dir / "movies.csv", {"movieId": "int", "title": "str?", "genres": "str?"}, q, cfg)
    n_read += n_items
    genres = items.pop("genres")
    items[S.CATEGORY] = genres.map(
        lambda g: None if not isinstance(g, str) or g == "(no genres listed)" else ", ".join(g.split("|")))
    items[S.SOURCE_ID] = items[S.ITEM_ID].astype(str)
    tpath = input_dir / "tags.csv"
    if tpath.exists() and tpath.stat().st_size > 0:
        tparts = []
        before = len(q)
        for df, lines in stream_csv(tpath, ["userId", "movieId", "tag", "timestamp"], q, chunk_rows=cfg.data.chunk_rows):
            n_read += len(df)
            tparts.append(_coerce(df, lines, tpath, q, {"userId": "int", "movieId": "int", "tag": "str", "timestamp": "ts"}))
        n_read += sum(1 for r in q.rows[before:] if r[S.QUARANTINE_FIELD] == "*")
        tags = pd.concat(tparts, ignore_index=True)
        # Tags describe the movie, so they join its text; the 10 most used per movie, most used first.
        tags["tag"] = tags["tag"].str.strip().str.lower()
        counts = tags.groupby(["movieId", "tag"]).size().rename("n").reset_index()
        counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True])
        top = counts.groupby("movieId").head(10).groupby("movieId")["tag"].agg(lambda t: "tags: " + ", ".join(t))
        items[S.ATTRIBUTES] = items[S.ITEM_ID].map(top)
    return Prepared(inter, items, q, n_read)


def _parse_meta_line(line: str) -> dict:
    """Amazon 2014 metadata lines are Python literals (single quotes); never ``eval`` them."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        value = ast.literal_eval(line)
        if not isinstance(value, dict):
            raise ValueError("not a dict literal")
        return value


def read_amazon2014(input_dir: Path, cfg: Settings) -> Prepared:
    """Raw Amazon 2014 files: ``ratings_<Cat>.csv`` and/or ``reviews_<Cat>_5.json.gz``, plus ``meta_<Cat>.json.gz``.

    Ratings are preferred for events when both exist (they are the superset). String ids (reviewer id,
    ASIN) are mapped to dense integers in order of first appearance; the originals stay in ``source_id``.
    """
    q = Quarantine()
    ratings = sorted(input_dir.glob("ratings_*.csv"))
    reviews = sorted(input_dir.glob("reviews_*.json*"))
    metas = sorted(input_dir.glob("meta_*.json*"))
    if not ratings and not reviews:
        raise DataError(input_dir, "no ratings_<Cat>.csv or reviews_<Cat>_5.json.gz found")
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}

    def uid(s: str) -> int:
        return user_ids.setdefault(s, len(user_ids) + 1)

    def iid(s: str) -> int:
        return item_ids.setdefault(s, len(item_ids) + 1)

    parts, n_read = [], 0
    if ratings:
        for path in ratings:
            before = len(q)
            for df, lines in stream_csv(path, ["user", "item", "rating", "timestamp"], q, header=False,
                                        chunk_rows=cfg.data.chunk_rows):
                n_read += len(df)
                good = _coerce(df, lines, path, q, {"user": "str", "item": "str", "rating": "float", "timestamp": "ts"})
                parts.append(pd.DataFrame({
                    S.USER_ID: np.fromiter((uid(u) for u in good["user"]), dtype=np.int64, count=len(good)),
                    S.ITEM_ID: np.fromiter((iid(i) for i in good["item"]), dtype=np.int64, count=len(good)),
                    S.EVENT_TIMESTAMP: good["timestamp"], S.RATING: good["rating"]}))
            n_read += sum(1 for r in q.rows[before:] if r[S.QUARANTINE_FIELD] == "*")
        event_type = "rating"
    else:
        for path in reviews:
            rows: list[tuple] = []
            for line_no, line in _iter_lines(path):
                n_read += 1
                try:
                    rec = json.loads(line)
                    ts = int(rec["unixReviewTime"])
                    if not _TS_MIN <= ts < _TS_MAX:
                        raise ValueError("unixReviewTime out of range")
                    rows.append((uid(str(rec["reviewerID"])), iid(str(rec["asin"])), ts, float(rec.get("overall", np.nan))))
                except (ValueError, KeyError, TypeError) as exc:
                    fld = exc.args[0] if isinstance(exc, KeyError) else "*"
                    q.add(path, line_no, str(fld), f"bad review record: {exc!r}", line[:2000])
            df = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, "ts", S.RATING])
            df[S.EVENT_TIMESTAMP] = pd.to_datetime(df.pop("ts"), unit="s", utc=True).astype(
                S.INTERACTION_COLUMNS[S.EVENT_TIMESTAMP])
            parts.append(df)
        event_type = "review"
    inter = pd.concat(parts, ignore_index=True)
    inter[S.EVENT_TYPE] = pd.array([event_type] * len(inter), dtype="string")

    records: list[dict] = []
    for path in metas:
        for line_no, line in _iter_lines(path):
            n_read += 1
            try:
                rec = _parse_meta_line(line)
                asin = str(rec["asin"])
            except (ValueError, SyntaxError, KeyError, TypeError, MemoryError) as exc:
                q.add(path, line_no, "asin" if isinstance(exc, KeyError) else "*", f"bad metadata record: {exc!r}",
                      line[:2000])
                continue
            records.append(_meta_record(rec, iid(asin), asin))
    if records:
        items = pd.DataFrame.from_records(records)
        items = items.drop_duplicates(S.ITEM_ID, keep="first")
    else:
        items = pd.DataFrame({S.ITEM_ID: pd.Series(dtype="int64")})
    # Every item that has events is part of the catalogue, even when its metadata is missing.
    missing = sorted(set(item_ids.values()) - set(items[S.ITEM_ID]))
    if missing:
        items = pd.concat([items, pd.DataFrame({S.ITEM_ID: missing})], ignore_index=True)
    inv = {v: k for k, v in item_ids.items()}
    items[S.SOURCE_ID] = items[S.ITEM_ID].map(inv)
    users = pd.DataFrame({S.USER_ID: list(user_ids.values()), S.SOURCE_ID: list(user_ids.keys())})
    return Prepared(inter, items, q, n_read, users=users)


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    _check_nonempty(path)
    with _open_text(path) as fh:
        for i, line in enumerate(fh, start=1):
            line = line.strip()
            if line:
                yield i, line


def _meta_record(rec: dict, item_id: int, asin: str) -> dict:
    def text(v: Any) -> str | None:
        if v is None:
            return None
        v = html.unescape(str(v)).strip()
        return v or None

    cats = rec.get("categories") or []
    # categories is a list of paths (lists); keep the most specific distinct labels in path order
    flat: list[str] = []
    for path in cats if isinstance(cats, list) else []:
        for c in path if isinstance(path, list) else [path]:
            c = text(c)
            if c and c not in flat:
                flat.append(c)
    price = rec.get("price")
    try:
        price = float(price) if price is not None else None
    except (TypeError, ValueError):
        price = None
    desc = rec.get("description")
    if isinstance(desc, list):
        desc = " ".join(map(str, desc))
    return {S.ITEM_ID: item_id, S.TITLE: text(rec.get("title")), S.CATEGORY: ", ".join(flat) or None,
            S.BRAND: text(rec.get("brand")), S.DESCRIPTION: text(desc), S.PRICE: price}


def _read_table(path_base: Path) -> tuple[pd.DataFrame, Path]:
    for suffix in (".parquet", ".csv"):
        p = path_base.with_suffix(suffix)
        if p.exists():
            _check_nonempty(p)
            return (pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p, dtype=str)), p
    raise DataError(path_base.with_suffix(".parquet"), "file not found (also tried .csv)")


def read_canonical(input_dir: Path, cfg: Settings) -> Prepared:
    """Already canonical tables: interactions.(parquet|csv) and items.(parquet|csv) with schema columns."""
    q = Quarantine()
    inter_raw, ipath = _read_table(input_dir / "interactions")
    items_raw, tpath = _read_table(input_dir / "items")
    for df, path, required in ((inter_raw, ipath, S.INTERACTION_REQUIRED), (items_raw, tpath, S.ITEM_REQUIRED)):
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise DataError(path, f"missing column(s) {missing}; columns are {list(df.columns)}")
    n_read = len(inter_raw) + len(items_raw)
    ts = inter_raw[S.EVENT_TIMESTAMP]
    if not pd.api.types.is_datetime64_any_dtype(ts):
        as_num = pd.to_numeric(ts, errors="coerce")
        parsed = pd.to_datetime(as_num, unit="s", utc=True, errors="coerce")
        parsed = parsed.where(as_num.notna(), pd.to_datetime(ts.where(as_num.isna()), utc=True, errors="coerce",
                                                              format="ISO8601"))
    else:
        parsed = pd.to_datetime(ts, utc=True)
    inter = pd.DataFrame({S.USER_ID: pd.to_numeric(inter_raw[S.USER_ID], errors="coerce"),
                          S.ITEM_ID: pd.to_numeric(inter_raw[S.ITEM_ID], errors="coerce"),
                          S.EVENT_TIMESTAMP: parsed})
    for opt in (S.RATING, S.EVENT_TYPE):
        if opt in inter_raw:
            inter[opt] = pd.to_numeric(inter_raw[opt], errors="coerce") if opt == S.RATING else inter_raw[opt]
    bad = inter[[S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP]].isna()
    for col in (S.USER_ID, S.ITEM_ID):
        bad[col] |= inter[col].notna() & (inter[col] % 1 != 0)
    line_offset = 2 if ipath.suffix == ".csv" else 1
    for i in np.flatnonzero(bad.any(axis=1).to_numpy()):
        fld = bad.columns[bad.iloc[i].to_numpy()][0]
        q.add(ipath, int(i) + line_offset, fld, "missing or invalid value", inter_raw.iloc[i].to_json(default_handler=str))
    inter = inter[~bad.any(axis=1)].reset_index(drop=True)
    inter[S.USER_ID] = inter[S.USER_ID].astype("int64")
    inter[S.ITEM_ID] = inter[S.ITEM_ID].astype("int64")
    items = items_raw.copy()
    ids = pd.to_numeric(items[S.ITEM_ID], errors="coerce")
    bad_items = ids.isna() | (ids % 1 != 0)
    line_offset = 2 if tpath.suffix == ".csv" else 1
    for i in np.flatnonzero(bad_items.to_numpy()):
        q.add(tpath, int(i) + line_offset, S.ITEM_ID, "missing or invalid item id", items_raw.iloc[i].to_json(default_handler=str))
    items = items[~bad_items].copy()
    items[S.ITEM_ID] = ids[~bad_items].astype("int64")
    return Prepared(inter, items, q, n_read)


READERS: dict[str, Callable[[Path, Settings], Prepared]] = {
    "seqrec": read_seqrec, "amazon2014": read_amazon2014, "movielens": read_movielens, "canonical": read_canonical,
}


# --------------------------------------------------------------------------------------------------
# Canonicalisation and prepare
# --------------------------------------------------------------------------------------------------
def canonical_items(items: pd.DataFrame, q: Quarantine, source: str) -> pd.DataFrame:
    """Schema columns and dtypes; duplicate item ids after the first go to quarantine."""
    items = items.copy()
    for col, dtype in S.ITEM_COLUMNS.items():
        if col not in items:
            items[col] = pd.Series([None] * len(items), dtype=dtype)
    extra = [c for c in items.columns if c not in S.ITEM_COLUMNS]
    items = items[list(S.ITEM_COLUMNS) + extra]
    dup = items[S.ITEM_ID].duplicated(keep="first").to_numpy()
    for i in np.flatnonzero(dup):
        q.add(source, int(i) + 1, S.ITEM_ID, "duplicate item id (first kept)",
              items.iloc[i].to_json(default_handler=str))
    items = items[~dup]
    for col, dtype in S.ITEM_COLUMNS.items():
        items[col] = items[col].astype(dtype)
    for col in S.ITEM_TEXT_FIELDS:  # whitespace-only text counts as missing
        s = items[col].str.strip()
        items[col] = s.where(s != "", None).astype("string")
    return items.sort_values(S.ITEM_ID, kind="stable").reset_index(drop=True)


def canonical_interactions(inter: pd.DataFrame) -> pd.DataFrame:
    inter = inter.copy()
    for col, dtype in S.INTERACTION_COLUMNS.items():
        if col not in inter:
            inter[col] = pd.Series([None] * len(inter), dtype=dtype)
        inter[col] = inter[col].astype(dtype)
    inter = inter[list(S.INTERACTION_COLUMNS)]
    # Stable sort keeps the source's order for events on the same timestamp (Amazon has day granularity).
    return inter.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable").reset_index(drop=True)


def kcore(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core: drop users and items with fewer than ``k`` events until none remain."""
    if k <= 1:
        return inter
    while True:
        u = inter.groupby(S.USER_ID)[S.ITEM_ID].transform("size")
        i = inter.groupby(S.ITEM_ID)[S.USER_ID].transform("size")
        keep = (u >= k) & (i >= k)
        if keep.all():
            return inter
        inter = inter[keep].reset_index(drop=True)


def prepare(cfg: Settings, fmt: str, input_path: str | Path, name: str) -> dict[str, Any]:
    """Read ``input_path`` in ``fmt`` and write ``$LEARN_HOME/data/<name>/`` (canonical Parquet + quarantine)."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    input_path = Path(input_path)
    if not input_path.exists():
        raise DataError(input_path, "input not found")
    prepared = READERS[fmt](input_path, cfg)
    q = prepared.quarantine
    items = canonical_items(prepared.items, q, str(input_path))
    inter = canonical_interactions(prepared.interactions)
    # An event for an item the catalogue does not have cannot be encoded: quarantine, don't invent items.
    unknown = ~inter[S.ITEM_ID].isin(items[S.ITEM_ID]).to_numpy()
    for i in np.flatnonzero(unknown):
        row = inter.iloc[i]
        q.add(str(input_path), -1, S.ITEM_ID, "event for an item not in the catalogue",
              f"{row[S.USER_ID]},{row[S.ITEM_ID]},{row[S.EVENT_TIMESTAMP]}")
    inter = inter[~unknown].reset_index(drop=True)
    n_before_kcore = len(inter)
    inter = kcore(inter, cfg.data.kcore)
    kept_rows = len(inter) + (n_before_kcore - len(inter)) + len(items)
    share = len(q) / max(prepared.rows_read, 1)
    if share > cfg.data.max_quarantine_share:
        raise DataError(input_path, f"{len(q)} of {prepared.rows_read} rows are malformed "
                        f"({share:.0%} > data.max_quarantine_share); first: {q.rows[0]}")
    out = cfg.paths.dataset(name)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(inter, out / "interactions.parquet")
    write_parquet(items, out / "items.parquet")
    write_parquet(q.frame(), out / "quarantine.parquet")
    if prepared.users is not None:
        write_parquet(prepared.users.astype(S.USER_COLUMNS), out / "users.parquet")
    splits = out / "splits"
    if splits.exists():  # derived from the old data: stale now
        shutil.rmtree(splits)
    manifest = {
        "name": name, "format": fmt, "input": str(input_path.resolve()),
        "rows_read": prepared.rows_read, "rows_kept": kept_rows - (n_before_kcore - len(inter)),
        "kcore_removed": n_before_kcore - len(inter), "quarantined": len(q),
        "interactions": len(inter), "users": int(inter[S.USER_ID].nunique()), "items": len(items),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    # Conservation: every row read is kept, quarantined or (on request) removed by the k-core filter.
    write_json(manifest, out / "manifest.json")
    return manifest


# --------------------------------------------------------------------------------------------------
# Loading prepared data
# --------------------------------------------------------------------------------------------------
def dataset_dir(cfg: Settings, name: str) -> Path:
    path = cfg.paths.dataset(name)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"dataset {name!r} is not prepared under {path}; run `learn data prepare` first")
    return path


def load_interactions(cfg: Settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_dir(cfg, name) / "interactions.parquet")


def load_items(cfg: Settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(dataset_dir(cfg, name) / "items.parquet")


def load_manifest(cfg: Settings, name: str) -> dict[str, Any]:
    return read_json(dataset_dir(cfg, name) / "manifest.json")


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------
def split_loo(inter: pd.DataFrame) -> pd.DataFrame:
    """Last event of each user -> test, second-to-last -> valid, rest -> train (users with >= 3 events).

    Users with 2 events give train + test; a user with one event is train only.
    """
    inter = canonical_interactions(inter)
    pos_from_end = inter.groupby(S.USER_ID).cumcount(ascending=False).to_numpy()
    n = inter.groupby(S.USER_ID)[S.ITEM_ID].transform("size").to_numpy()
    split = np.full(len(inter), S.TRAIN, dtype=object)
    split[(pos_from_end == 0) & (n >= 2)] = S.TEST
    split[(pos_from_end == 1) & (n >= 3)] = S.VALID
    inter[S.SPLIT] = pd.array(split, dtype="string")
    return inter


def temporal_cutoffs(inter: pd.DataFrame, cfg: Settings) -> tuple[pd.Timestamp, pd.Timestamp]:
    ts = inter[S.EVENT_TIMESTAMP]
    if cfg.data.temporal_cutoff:
        test_cut = pd.Timestamp(cfg.data.temporal_cutoff)
        test_cut = test_cut.tz_localize("UTC") if test_cut.tzinfo is None else test_cut.tz_convert("UTC")
        valid_cut = ts[ts < test_cut].quantile(cfg.data.temporal_valid_quantile / cfg.data.temporal_test_quantile)
    else:
        test_cut = ts.quantile(cfg.data.temporal_test_quantile)
        valid_cut = ts.quantile(cfg.data.temporal_valid_quantile)
    # Amazon timestamps are whole days: snap cut-offs to the next midnight so a day is never split.
    return valid_cut.ceil("D"), test_cut.ceil("D")


def split_temporal(inter: pd.DataFrame, cfg: Settings) -> pd.DataFrame:
    """Global cut-offs: train < valid_cut <= valid < test_cut <= test."""
    inter = canonical_interactions(inter)
    valid_cut, test_cut = temporal_cutoffs(inter, cfg)
    ts = inter[S.EVENT_TIMESTAMP]
    split = np.where(ts >= test_cut, S.TEST, np.where(ts >= valid_cut, S.VALID, S.TRAIN))
    inter[S.SPLIT] = pd.array(split, dtype="string")
    inter.attrs["valid_cutoff"], inter.attrs["test_cutoff"] = str(valid_cut), str(test_cut)
    return inter


def load_split(cfg: Settings, name: str, protocol: str) -> pd.DataFrame:
    """The dataset's interactions with a ``split`` column, cached under ``splits/<protocol>.parquet``."""
    if protocol not in S.PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {S.PROTOCOLS}")
    path = dataset_dir(cfg, name) / "splits" / f"{protocol}.parquet"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and read_json(meta_path).get("data") == _split_key(cfg, protocol):
        df = pd.read_parquet(path)
        df.attrs.update(read_json(meta_path).get("attrs", {}))
        return df
    inter = load_interactions(cfg, name)
    df = split_loo(inter) if protocol == S.PROTOCOL_LOO else split_temporal(inter, cfg)
    write_parquet(df, path)
    write_json({"data": _split_key(cfg, protocol), "attrs": df.attrs}, meta_path)
    return df


def _split_key(cfg: Settings, protocol: str) -> dict:
    d = cfg.data
    return {"protocol": protocol, "cutoff": d.temporal_cutoff, "tq": d.temporal_test_quantile,
            "vq": d.temporal_valid_quantile}


def run_split(cfg: Settings, name: str, protocol: str) -> dict[str, Any]:
    df = load_split(cfg, name, protocol)
    counts = df[S.SPLIT].value_counts().to_dict()
    return {"dataset": name, "protocol": protocol, **{k: int(v) for k, v in counts.items()}, **df.attrs}


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def stats(cfg: Settings, name: str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------
# Fetch: public URL with sha256 check, or a local mirror
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicDataset:
    name: str
    format: str
    files: dict[str, str | None]  # file name -> sha256 (None: not published, verified on second fetch)
    urls: dict[str, str]  # file or archive name -> public URL
    archive_member_prefix: str = ""


DATASETS: dict[str, PublicDataset] = {
    "amazon-books-2014-sample": PublicDataset(
        "amazon-books-2014-sample", "seqrec",
        {"interactions.csv": "edb295fefa07e63b91b2a5464217cc34bfb0ca000be388bd716f314c4de12e29",
         "items.csv": "823a9e2333de5db65abf4607b51928a06ad3067f0d802fc75dbda3f5043dcd9c"},
        # The SeqRec benchmark publishes this sample as proc.zip; the CSV pair is its lossless conversion.
        {"proc.zip": "https://github.com/Tiny-Snow/SeqRecBenchmark-Datasets/raw/3bc413ed/"
                     "data/amazon2014-book_1000000/proc.zip"},
    ),
    "movielens-latest-small": PublicDataset(
        "movielens-latest-small", "movielens",
        {"ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
         "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
         "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d"},
        {"ml-latest-small.zip": "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"},
        archive_member_prefix="ml-latest-small/",
    ),
    "amazon-books-2014": PublicDataset(
        "amazon-books-2014", "amazon2014",
        {"ratings_Books.csv": None, "meta_Books.json.gz": None},
        {"ratings_Books.csv": "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Books.csv",
         "meta_Books.json.gz": "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Books.json.gz"},
    ),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_mirror(cfg: Settings) -> Path | None:
    if cfg.data.mirror:
        return Path(cfg.data.mirror)
    for cand in (Path.cwd() / ".." / "shared" / "datasets", REPO_ROOT.parent / "shared" / "datasets"):
        if cand.is_dir():
            return cand.resolve()
    return None


def fetch(cfg: Settings, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Place dataset ``name``'s files under ``$LEARN_HOME/raw/<name>/``, checking each file's sha256."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    ds = DATASETS[name]
    dest = cfg.paths.raw(name)
    dest.mkdir(parents=True, exist_ok=True)
    mirror = default_mirror(cfg)
    source = None
    if mirror is not None and (mirror / name).is_dir():
        for fname in ds.files:
            src = mirror / name / fname
            if not src.exists():
                raise DataError(src, f"mirror {mirror} lacks {fname} of dataset {name}")
            if not (dest / fname).exists() or sha256_file(dest / fname) != sha256_file(src):
                tmp = dest / f".tmp-{fname}"
                shutil.copyfile(src, tmp)
                tmp.replace(dest / fname)
        source = f"mirror:{mirror / name}"
    else:
        if ds.format == "seqrec":
            raise DataError(name, "this sample is published as a SeqRec proc.zip that needs its own conversion; "
                            "set LEARN_DATA_MIRROR to a folder holding amazon-books-2014-sample/*.csv")
        for fname, url in ds.urls.items():
            _download(url, dest / fname, timeout_s)
            if fname.endswith(".zip"):
                with zipfile.ZipFile(dest / fname) as zf:
                    for member in ds.files:
                        with zf.open(ds.archive_member_prefix + member) as src, open(dest / member, "wb") as out:
                            shutil.copyfileobj(src, out)
        source = "download"
    checks = {}
    for fname, digest in ds.files.items():
        got = sha256_file(dest / fname)
        if digest is not None and got != digest:
            raise DataError(dest / fname, f"sha256 mismatch: expected {digest}, got {got}")
        checks[fname] = got
    return {"dataset": name, "path": str(dest), "source": source, "format": ds.format, "sha256": checks}


def _download(url: str, dest: Path, timeout_s: float) -> None:
    tmp = dest.with_name(f".tmp-{dest.name}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(url, f"download failed ({exc}); no network? Set LEARN_DATA_MIRROR to a local copy") from exc
    tmp.replace(dest)


def ensure_prepared(cfg: Settings, name: str) -> dict[str, Any]:
    """Fetch and prepare a registered public dataset unless it is already prepared."""
    if (cfg.paths.dataset(name) / "manifest.json").exists():
        return load_manifest(cfg, name)
    info = fetch(cfg, name)
    return prepare(cfg, info["format"], info["path"], name)
