"""CEG text: the item text an embedding is computed from, and the records of items that have none.

:func:`render_text` fills a template over the item's fields. A clause in ``[...]`` is left out when a
field it names is missing, and ``[a|b|c]`` takes the first alternative whose fields all exist, so one
template covers items with a title only and items with title, category and brand. Field values are
cleaned first (HTML entities and tags, control characters, runs of whitespace).

:func:`prepare_items` renders a whole catalogue. Bad input never disappears: an item whose template
fields are all empty, whitespace or markup, or a later duplicate of an item id, becomes a quarantine
record with its reason; a field with non-UTF-8 bytes is dropped (the item is rendered from the other
fields, or quarantined when none are left) and the repair is recorded. :func:`content_hash` of the
rendered text decides when an item must be re-encoded.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S

ACTION = "action"  # quarantine column: "quarantined" (item not encoded) or "repaired" (encoded anyway)
QUARANTINED, REPAIRED = "quarantined", "repaired"
QUARANTINE_COLUMNS: dict[str, str] = {S.ITEM_ID: "int64", **S.QUARANTINE_COLUMNS, ACTION: "string"}


# --------------------------------------------------------------------------------------------------
# Templates and text cleaning
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Clause:
    alternatives: tuple[tuple[str, tuple[str, ...]], ...]  # (format string, field names)
    optional: bool


_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]{0,500}>", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@lru_cache(maxsize=64)
def parse_template(template: str) -> tuple[_Clause, ...]:
    """Split a template into fixed text and optional clauses ``[...]`` (alternatives split by ``|``).

    ``\\[``, ``\\]``, ``\\|`` and ``\\\\`` stand for the literal characters; ``{{``/``}}`` are literal
    braces as in :meth:`str.format`. Clauses do not nest.
    """
    clauses: list[_Clause] = []
    buf: list[str] = []
    alts: list[str] | None = None  # not None while inside [...]
    i = 0

    def flush_fixed() -> None:
        if buf:
            clauses.append(_Clause(((s := "".join(buf), _fields(s, template)),), optional=False))
            buf.clear()

    while i < len(template):
        ch = template[i]
        if ch == "\\" and i + 1 < len(template) and template[i + 1] in "[]|\\":
            buf.append(template[i + 1])
            i += 2
            continue
        if ch == "[":
            if alts is not None:
                raise ValueError(f"template: nested '[' at position {i}: {template!r}")
            flush_fixed()
            alts = []
        elif ch == "|" and alts is not None:
            alts.append("".join(buf))
            buf.clear()
        elif ch == "]":
            if alts is None:
                raise ValueError(f"template: ']' without '[' at position {i}: {template!r}")
            alts.append("".join(buf))
            buf.clear()
            clauses.append(_Clause(tuple((a, _fields(a, template)) for a in alts), optional=True))
            alts = None
        else:
            buf.append(ch)
        i += 1
    if alts is not None:
        raise ValueError(f"template: '[' is never closed: {template!r}")
    flush_fixed()
    return tuple(clauses)


def _fields(fmt: str, template: str) -> tuple[str, ...]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template: {exc}: {template!r}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"template: field {{{name}}} must be a plain column name: {template!r}")
    return tuple(dict.fromkeys(names))


def template_fields(template: str) -> tuple[str, ...]:
    """Every field the template names, in order of first use."""
    out: dict[str, None] = {}
    for clause in parse_template(template):
        for _, names in clause.alternatives:
            out.update(dict.fromkeys(names))
    return tuple(out)


def clean_value(value: Any) -> tuple[Any, str | None]:
    """One field value -> (cleaned value or None when missing, why it is missing or None).

    Strings are decoded (bytes must be UTF-8), HTML-unescaped, stripped of tags and control
    characters and whitespace-collapsed. Numbers pass through (NaN is missing).
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None, "missing"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non-UTF-8 bytes"
    if isinstance(value, str):
        if _SURROGATE.search(value):  # undecodable bytes read with errors="surrogateescape"
            return None, "non-UTF-8 bytes"
        if not value.strip():
            return None, "empty or whitespace only"
        text = _TAG.sub(" ", html.unescape(value))
        text = " ".join(_CONTROL.sub(" ", text).split())
        if not text:
            return None, "markup only"
        return text, None
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None, "missing"
    if isinstance(value, (int, float, np.integer, np.floating, bool)):
        return value, None
    return clean_value(str(value))


def _render_values(values: Mapping[str, Any], clauses: Sequence[_Clause]) -> tuple[str, int]:
    """Render parsed clauses over cleaned values; returns (text, number of fields used)."""
    parts: list[str] = []
    used: set[str] = set()
    for clause in clauses:
        for fmt, names in clause.alternatives:
            if clause.optional and any(values.get(n) is None for n in names):
                continue
            parts.append(fmt.format_map({n: ("" if values.get(n) is None else values[n]) for n in names}))
            used.update(n for n in names if values.get(n) is not None)
            break
    return " ".join("".join(parts).split()), len(used)


def render_text(item: Mapping[str, Any], template: str) -> str:
    """The item's text: the template filled with its cleaned fields, clauses with missing fields left out.

    >>> render_text({"title": "Dune"}, 'Item title is "{title}".[ Brand is "{brand}".]')
    'Item title is "Dune".'
    """
    clauses = parse_template(template)
    values = {f: clean_value(item.get(f))[0] for f in template_fields(template)}
    return _render_values(values, clauses)[0]


def content_hash(text: str) -> str:
    """Hash of the rendered text: an item is re-encoded exactly when this changes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class PreparedItems:
    """Catalogue rows split into encodable texts and quarantine records (one per problem)."""

    item_ids: np.ndarray  # int64, every input row (duplicates included)
    texts: list[str | None]  # rendered text per row; None = not encodable (quarantined)
    hashes: list[str | None]
    quarantine: pd.DataFrame  # item_id, line, field, reason, raw, action
    ok: np.ndarray = field(init=False)  # bool per row: has a text

    def __post_init__(self) -> None:
        self.ok = np.fromiter((t is not None for t in self.texts), dtype=bool, count=len(self.texts))


def prepare_items(items: pd.DataFrame, template: str, source: str = "items", dedupe: bool = True) -> PreparedItems:
    """Render every row; rows without any text (or later duplicates of an id) become quarantine records.

    ``line`` in the records is the 1-based row in ``items``; ``raw`` is the row as JSON.
    """
    clauses = parse_template(template)
    fields = template_fields(template)
    n = len(items)
    if S.ITEM_ID in items:
        ids = pd.to_numeric(items[S.ITEM_ID], errors="coerce")
        if ids.isna().any():
            bad = int(np.flatnonzero(ids.isna().to_numpy())[0])
            raise ValueError(f"{source}, row {bad + 1}, field '{S.ITEM_ID}': missing or not an integer")
        item_ids = ids.to_numpy(dtype=np.int64)
    else:  # a frame of new items without ids yet (online encoding): rows are their own ids
        item_ids = np.arange(n, dtype=np.int64)
    dup = pd.Series(item_ids).duplicated(keep="first").to_numpy() if dedupe else np.zeros(n, dtype=bool)
    columns = {f: (items[f].tolist() if f in items else [None] * n) for f in fields}
    texts: list[str | None] = []
    hashes: list[str | None] = []
    records: list[dict[str, Any]] = []

    def record(i: int, fld: str, reason: str, action: str) -> None:
        raw = json.dumps({str(c): _jsonable(v) for c, v in items.iloc[i].items()}, ensure_ascii=False, default=str)
        records.append({S.ITEM_ID: int(item_ids[i]), S.QUARANTINE_FILE: source, S.QUARANTINE_LINE: i + 1,
                        S.QUARANTINE_FIELD: fld, S.QUARANTINE_REASON: reason,
                        S.QUARANTINE_RAW: _safe_raw(raw), ACTION: action})

    for i in range(n):
        if dup[i]:
            record(i, S.ITEM_ID, "duplicate item id (first occurrence kept)", QUARANTINED)
            texts.append(None)
            hashes.append(None)
            continue
        values: dict[str, Any] = {}
        why: dict[str, str] = {}
        for f in fields:
            values[f], problem = clean_value(columns[f][i])
            if problem:
                why[f] = problem
        text, used = _render_values(values, clauses)
        if used == 0:
            detail = "; ".join(f"{f}: {why.get(f, 'missing')}" for f in fields)
            record(i, ",".join(fields), f"no text to encode ({detail})", QUARANTINED)
            texts.append(None)
            hashes.append(None)
            continue
        for f, problem in why.items():
            if problem == "non-UTF-8 bytes":
                record(i, f, "non-UTF-8 bytes: field left out, item encoded from its other fields", REPAIRED)
        texts.append(text)
        hashes.append(content_hash(text))
    q = pd.DataFrame(records, columns=QUARANTINE_COLUMNS)
    return PreparedItems(item_ids, texts, hashes, q.astype(QUARANTINE_COLUMNS))



def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _safe_raw(raw: str, limit: int = 2000) -> str:
    # Lone surrogates cannot be written as UTF-8 Parquet: keep them visible as \udcXX escapes.
    raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw if len(raw) <= limit else raw[:limit] + f"... [{len(raw) - limit} more chars]"
