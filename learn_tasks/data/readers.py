"""Readers: public dataset formats (SeqRec CSV, Amazon 2014, MovieLens, canonical tables) into frames.

Every reader streams its input (CSV in row batches, JSON lines one at a time) and sorts rows into
*kept* or *quarantined*: a row that cannot be parsed goes to the :class:`Quarantine` with the file,
line, field and reason, so ``rows read = rows kept + rows quarantined`` always holds. Problems with a
whole file (missing, empty, missing column) raise :class:`DataError` naming the file. A reader returns
a :class:`Prepared` bundle; :func:`learn_tasks.data.datasets.prepare_dataset` canonicalises and writes it.
"""
from __future__ import annotations

import ast
import csv
import gzip
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings

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
