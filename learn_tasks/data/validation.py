"""Great Expectations validation of interaction logs and the item catalogue, with row-level quarantine.

Why here: every later stage trusts its input. A malformed id, a timestamp from the future or an event
for an item nobody can encode would otherwise surface as a crash deep inside training or, worse, as a
silently wrong model. This module checks each batch once, at the door.

How:

* Input tables are *raw* frames (:mod:`learn_tasks.data.raw`): the canonical column names with every
  value kept as the source wrote it, plus ``_file``/``_line`` provenance, extended with parsed and
  derived columns (``event_time``, ``rating_value``, ``item_in_catalogue``, ``duplicate_rank``,
  ``text_chars``, ...) so that every rule is a plain column expectation that GX evaluates row by row.
* The suites (:func:`interaction_suite`, :func:`item_suite`) are built in code (GX 1.x, ephemeral
  context, pandas data source) and run with ``result_format=COMPLETE``, which lists the index of every
  failing row. A row failing any expectation is quarantined with the first failed check (suite order =
  precedence), all failed checks, its source file and line, and the raw values; the other rows are
  accepted. ``read = accepted + quarantined`` holds for each table and is asserted.
* Results are saved per run under ``$LEARN_HOME/reports/validation/<run_key>/`` (GX JSON results, a
  summary, and GX Data Docs HTML); quarantined rows under ``$LEARN_HOME/quarantine/<dataset>/<run_key>/``.
  A run key names the data interval, so re-validating the same interval replaces its own files only.
* When the failed share of a table exceeds ``validate.max_failed_share`` the batch fails
  (:class:`ValidationFailed`) after everything above is written, so the evidence is kept.

:func:`validate_files` is the `learn validate` entry point; :func:`validate_tables` validates frames.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import artifacts
from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data.datasets import dataset_dir, load_items
from learn_tasks.data.raw import (
    DUPLICATE_RANK, EVENT_TIME, FILE_COL, ITEM_IN_CATALOGUE, LINE_COL, PRICE_VALUE, RATING_VALUE, TEXT_CHARS,
    find_batch_files, interaction_frame, item_frame, raw_from_frame, read_raw_files,
)
from learn_tasks.data.readers import DataError
from learn_tasks.storage import atomic_dir, write_json, write_parquet

# Formats the suites accept, as regular expressions over the raw text.
ID_REGEX = r"^[0-9]{1,18}$"  # non-negative int64 without sign, exponent or decimals
NUMBER_REGEX = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
TIMESTAMP_REGEX = (
    r"^(?:[0-9]{1,11}(?:\.[0-9]+)?"  # unix seconds
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?)?"  # ISO 8601 date[time]
    r"(?: ?(?:Z|[+-][0-9]{2}:?[0-9]{2}))?)$"  # optional zone
)
SOURCE_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"


class ValidationFailed(RuntimeError):
    """A batch whose failed share exceeds the threshold; ``summary`` says which checks and where."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary



# --------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Which event times a batch may hold: [start, end) and never after ``now`` (+ clock skew)."""

    start: pd.Timestamp | None
    end: pd.Timestamp | None
    now: pd.Timestamp

    @staticmethod
    def of(start: Any = None, end: Any = None, now: Any = None) -> "Window":
        return Window(_ts(start), _ts(end), _ts(now) or pd.Timestamp.now(tz="UTC"))


def _ts(value: Any) -> pd.Timestamp | None:
    return None if value is None else S.to_utc(value)


def _meta(check: str, fld: str, reason: str) -> dict[str, str]:
    return {"check": check, "field": fld, "reason": reason}


def interaction_suite(cfg: Settings, window: Window):
    """Expectations for interaction logs, in precedence order (the first failure names a bad row)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    v = cfg.validate_
    future_limit = window.now + pd.Timedelta(seconds=v.future_tolerance_s)
    ex: list[Any] = []
    for col in (S.USER_ID, S.ITEM_ID):
        ex.append(gxe.ExpectColumnValuesToNotBeNull(column=col, meta=_meta(f"{col}_present", col, f"{col} is missing")))
        ex.append(gxe.ExpectColumnValuesToMatchRegex(
            column=col, regex=ID_REGEX,
            meta=_meta(f"{col}_format", col, f"{col} is not a non-negative integer id (malformed type)")))
    ex.append(gxe.ExpectColumnValuesToNotBeNull(
        column=S.EVENT_TIMESTAMP, meta=_meta("timestamp_present", S.EVENT_TIMESTAMP, "event_timestamp is missing (NaN)")))
    ex.append(gxe.ExpectColumnValuesToMatchRegex(
        column=S.EVENT_TIMESTAMP, regex=TIMESTAMP_REGEX,
        meta=_meta("timestamp_format", S.EVENT_TIMESTAMP, "event_timestamp is neither unix seconds nor ISO 8601")))
    ex.append(gxe.ExpectColumnValuesToNotBeNull(
        column=EVENT_TIME, meta=_meta("timestamp_valid", S.EVENT_TIMESTAMP, "event_timestamp is not a valid time")))
    ex.append(gxe.ExpectColumnValuesToBeBetween(
        column=EVENT_TIME, max_value=future_limit,
        meta=_meta("timestamp_not_future", S.EVENT_TIMESTAMP, f"event_timestamp is in the future (after {future_limit})")))
    if window.start is not None or window.end is not None:
        ex.append(gxe.ExpectColumnValuesToBeBetween(
            column=EVENT_TIME, min_value=window.start, max_value=window.end, strict_max=window.end is not None,
            meta=_meta("timestamp_in_interval", S.EVENT_TIMESTAMP,
                       f"event_timestamp is outside the run's data interval [{window.start}, {window.end})")))
    ex.append(gxe.ExpectColumnValuesToMatchRegex(
        column=S.RATING, regex=NUMBER_REGEX, meta=_meta("rating_format", S.RATING, "rating is not a number")))
    ex.append(gxe.ExpectColumnValuesToBeBetween(
        column=RATING_VALUE, min_value=v.rating_min, max_value=v.rating_max,
        meta=_meta("rating_range", S.RATING, f"rating is outside [{v.rating_min}, {v.rating_max}]")))
    ex.append(gxe.ExpectColumnValuesToBeInSet(
        column=ITEM_IN_CATALOGUE, value_set=[True],
        meta=_meta("known_item", S.ITEM_ID, "event for an item not in the catalogue")))
    ex.append(gxe.ExpectColumnValuesToBeInSet(
        column=DUPLICATE_RANK, value_set=[1],
        meta=_meta("duplicate_event", "*", "duplicate event (same user, item and time as an earlier row)")))
    return gx.ExpectationSuite(name="interactions", expectations=ex,
                               meta={"description": "interaction logs: schema, ids, time window, ratings, duplicates"})


def item_suite(cfg: Settings):
    """Expectations for the item catalogue, in precedence order."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    v = cfg.validate_
    ex: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(column=S.ITEM_ID, meta=_meta("item_id_present", S.ITEM_ID, "item_id is missing")),
        gxe.ExpectColumnValuesToMatchRegex(
            column=S.ITEM_ID, regex=ID_REGEX,
            meta=_meta("item_id_format", S.ITEM_ID, "item_id is not a non-negative integer id (malformed type)")),
        gxe.ExpectColumnValuesToBeInSet(
            column=DUPLICATE_RANK, value_set=[1],
            meta=_meta("duplicate_item", S.ITEM_ID, "duplicate item_id (an earlier row has the same id)")),
        gxe.ExpectColumnValuesToNotBeNull(column=S.TITLE, meta=_meta("title_present", S.TITLE, "title is empty")),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=S.TITLE, min_value=1, max_value=v.max_title_chars,
            meta=_meta("title_length", S.TITLE, f"title is longer than {v.max_title_chars} characters")),
        gxe.ExpectColumnValuesToBeBetween(
            column=TEXT_CHARS, min_value=1, max_value=v.max_text_chars,
            meta=_meta("text_length", "*", f"item text is empty or longer than {v.max_text_chars} characters")),
        gxe.ExpectColumnValuesToMatchRegex(
            column=S.SOURCE_ID, regex=SOURCE_ID_REGEX,
            meta=_meta("source_id_format", S.SOURCE_ID, "source_id has characters outside [A-Za-z0-9_.:-]")),
        gxe.ExpectColumnValuesToMatchRegex(
            column=S.PRICE, regex=NUMBER_REGEX, meta=_meta("price_format", S.PRICE, "price is not a number")),
        gxe.ExpectColumnValuesToBeBetween(
            column=PRICE_VALUE, min_value=0, meta=_meta("price_range", S.PRICE, "price is negative")),
    ]
    return gx.ExpectationSuite(name="items", expectations=ex,
                               meta={"description": "item catalogue: ids, duplicates, text present and not over-long"})


# --------------------------------------------------------------------------------------------------
# Running a suite and mapping failures back to rows
# --------------------------------------------------------------------------------------------------
@dataclass
class TableResult:
    name: str
    read: int
    accepted: pd.DataFrame  # raw rows that passed every expectation
    quarantine: pd.DataFrame  # rows that failed, with the failed expectation(s)
    by_check: dict[str, int] = field(default_factory=dict)  # rows whose *first* failure is this check
    gx_result: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_share(self) -> float:
        return len(self.quarantine) / self.read if self.read else 0.0

    def summary(self, threshold: float) -> dict[str, Any]:
        return {"read": self.read, "accepted": len(self.accepted), "quarantined": len(self.quarantine),
                "failed_share": round(self.failed_share, 6), "by_check": dict(sorted(self.by_check.items())),
                "passed": self.failed_share <= threshold, "gx_success": bool(self.gx_result.get("success", True))}


def _gx_context(docs_dir: Path | None):
    """An ephemeral GX context (nothing on disk but the Data Docs site we ask for), quiet and offline."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site, conf in list((ctx.variables.data_docs_sites or {}).items()):
        # The default site is a fresh temporary folder GX made for this context: remove it with the site.
        tmp = Path(str((conf.get("store_backend") or {}).get("base_directory", "")))
        ctx.delete_data_docs_site(site)
        if tmp.name.startswith("tmp") and tmp.parent == Path(tempfile.gettempdir()) and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="learn", site_config={
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    return ctx


def run_suite(ctx, name: str, frame: pd.DataFrame, suite, raw: pd.DataFrame, with_docs: bool) -> TableResult:
    """Validate ``frame`` with ``suite`` in ``ctx``; split ``raw`` (same rows) into accepted and quarantined."""
    import great_expectations as gx

    frame = frame.reset_index(drop=True)
    if ctx.data_sources.all().get("learn") is None:
        ctx.data_sources.add_pandas("learn")
    batch = ctx.data_sources.get("learn").add_dataframe_asset(name).add_batch_definition_whole_dataframe("batch")
    suite = ctx.suites.add(suite)
    vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["learn"])] if with_docs else []
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[vdef], actions=actions, result_format={"result_format": "COMPLETE"}))
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    (vresult,) = run.run_results.values()

    failed: dict[int, list[dict[str, str]]] = {}
    for res in vresult.results:
        meta = dict(res.expectation_config.meta or {})
        info = res.exception_info or {}
        if info.get("raised_exception"):
            # An expectation that could not run is a bug in the suite, not a bad row: stop loudly.
            raise RuntimeError(f"{name}: expectation {res.expectation_config.type} on "
                               f"{res.expectation_config.kwargs.get('column')} raised: {info.get('exception_message')}")
        if res.success:
            continue
        entry = {"check": meta.get("check", res.expectation_config.type), "field": meta.get("field", "*"),
                 "reason": meta.get("reason", res.expectation_config.type),
                 "expectation": res.expectation_config.type}
        for idx in res.result.get("unexpected_index_list") or []:
            failed.setdefault(int(idx), []).append(entry)

    rows = np.fromiter(sorted(failed), dtype=np.int64, count=len(failed))
    bad = np.zeros(len(raw), dtype=bool)
    bad[rows] = True
    by_check: dict[str, int] = {}
    records = []
    raw = raw.reset_index(drop=True)
    value_cols = [c for c in raw.columns if c not in (FILE_COL, LINE_COL)]
    for i in rows:
        first = failed[int(i)][0]
        by_check[first["check"]] = by_check.get(first["check"], 0) + 1
        row = raw.iloc[int(i)]
        records.append({
            S.QUARANTINE_FILE: str(row[FILE_COL]), S.QUARANTINE_LINE: int(row[LINE_COL]),
            S.QUARANTINE_FIELD: first["field"], S.QUARANTINE_REASON: first["reason"],
            S.QUARANTINE_RAW: json.dumps({c: row[c] for c in value_cols}, default=str),
            "check": first["check"], "expectation": first["expectation"],
            "failed_checks": ";".join(e["check"] for e in failed[int(i)]),
        })
    quarantine = pd.DataFrame.from_records(records, columns=list(QUARANTINE_COLUMNS))
    quarantine = quarantine.astype(QUARANTINE_COLUMNS)
    accepted = raw[~bad].reset_index(drop=True)
    result = TableResult(name, len(raw), accepted, quarantine, by_check, vresult.to_json_dict())
    # Conservation: every row read is either accepted or quarantined, never both, never neither.
    assert result.read == len(result.accepted) + len(result.quarantine), (name, result.read)
    return result


QUARANTINE_COLUMNS: dict[str, str] = dict(S.QUARANTINE_COLUMNS) | {
    "check": "string", "expectation": "string", "failed_checks": "string"}


# --------------------------------------------------------------------------------------------------
# One validation run: both tables, quarantine, reports
# --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    summary: dict[str, Any]
    interactions: TableResult | None
    items: TableResult | None


def run_key(dataset: str, start: Any = None, end: Any = None) -> str:
    """A file-name-safe key for a dataset and data interval: ``<dataset>_<start>_<end>`` (``all`` = open)."""
    def fmt(v: Any) -> str:
        ts = _ts(v)
        return "all" if ts is None else ts.strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", dataset)
    return f"{safe}_{fmt(start)}_{fmt(end)}"


def validate_tables(
    cfg: Settings,
    dataset: str,
    interactions: pd.DataFrame | None,
    items: pd.DataFrame | None,
    *,
    catalogue_ids: np.ndarray | None = None,
    start: Any = None,
    end: Any = None,
    now: Any = None,
    key: str | None = None,
    raise_on_failure: bool = True,
) -> Outcome:
    """Validate raw ``items`` then raw ``interactions``; write quarantine and reports; return the split.

    Items are validated first because events may refer to items of the same batch: the catalogue for
    the unknown-item check is ``catalogue_ids`` plus the batch's accepted items.
    Raises :class:`ValidationFailed` (after writing everything) when a table's failed share exceeds
    ``validate.max_failed_share`` and ``raise_on_failure``.
    """
    window = Window.of(start, end, now)
    key = key or run_key(dataset, window.start, window.end)
    threshold = cfg.validate_.max_failed_share
    report_dir = cfg.paths.reports("validation") / key
    quarantine_dir = cfg.paths.quarantine_batch(dataset, key)
    with_docs = cfg.validate_.data_docs
    summary: dict[str, Any] = {
        "dataset": dataset, "run_key": key, "interval": [_iso(window.start), _iso(window.end)],
        "now": _iso(window.now), "threshold": threshold,
        "reports": str(report_dir), "quarantine": str(quarantine_dir),
    }
    item_res = inter_res = None
    with atomic_dir(report_dir) as tmp:
        ctx = _gx_context(tmp / "data_docs" if with_docs else None)
        if items is not None:
            item_res = run_suite(ctx, "items", item_frame(items), item_suite(cfg), items, with_docs)
            summary["items"] = item_res.summary(threshold)
        if interactions is not None:
            cat = None
            if catalogue_ids is not None or item_res is not None:
                parts = [np.asarray(catalogue_ids if catalogue_ids is not None else [], dtype=np.int64)]
                if item_res is not None and len(item_res.accepted):
                    parts.append(item_res.accepted[S.ITEM_ID].astype("int64").to_numpy())
                cat = np.unique(np.concatenate(parts))
            inter_res = run_suite(ctx, "interactions", interaction_frame(interactions, cat),
                                  interaction_suite(cfg, window), interactions, with_docs)
            summary["interactions"] = inter_res.summary(threshold)
        for res in (item_res, inter_res):
            if res is not None:
                write_json(res.gx_result, tmp / f"{res.name}.json")
        if with_docs:
            _prune_docs(tmp / "data_docs")
            summary["data_docs"] = str(report_dir / "data_docs" / "index.html")
        summary["passed"] = all(summary[t]["passed"] for t in ("items", "interactions") if t in summary)
        write_json(summary, tmp / "summary.json")
    for res in (item_res, inter_res):
        if res is not None:
            write_parquet(res.quarantine, quarantine_dir / f"{res.name}.parquet")
    artifacts.publish(cfg, report_dir)  # a URL home: reports and quarantined rows are readable from any host
    if artifacts.is_remote(cfg) and artifacts.local_files(quarantine_dir):
        artifacts.publish(cfg, quarantine_dir)
    if raise_on_failure and not summary["passed"]:
        worst = [f"{t}: {summary[t]['quarantined']} of {summary[t]['read']} rows failed "
                 f"({summary[t]['failed_share']:.1%} > {threshold:.1%}; by check {summary[t]['by_check']})"
                 for t in ("items", "interactions") if t in summary and not summary[t]["passed"]]
        raise ValidationFailed(f"validation of {dataset} [{key}] failed: " + "; ".join(worst)
                               + f". Quarantine: {quarantine_dir}; report: {report_dir}", summary)
    return Outcome(summary, inter_res, item_res)


def _iso(ts: pd.Timestamp | None) -> str | None:
    return None if ts is None else ts.isoformat()


def _prune_docs(docs: Path) -> None:
    """Drop the multi-megabyte tutorial GIFs GX copies into every site (no generated page uses them)."""
    images = docs / "static" / "images"
    if not images.is_dir():
        return
    pages = " ".join(p.read_text(encoding="utf-8", errors="ignore") for p in docs.rglob("*.html"))
    for img in images.glob("*.gif"):
        if img.name not in pages:
            img.unlink()



# --------------------------------------------------------------------------------------------------
# Stage entry point (`learn validate`)
# --------------------------------------------------------------------------------------------------
def validate_files(
    cfg: Settings,
    dataset: str,
    input: str | Path | None = None,
    start: Any = None,
    end: Any = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Validate a dataset and return the summary (counts per table and check, report and quarantine paths).

    Without ``input`` the prepared tables of ``dataset`` are checked in place (nothing is changed).
    With ``input`` (a folder holding ``interactions*.csv|parquet`` and/or ``items*.csv|parquet``, or
    one such file) that new batch is checked against the dataset's catalogue, as the pipeline's
    ``validate_logs`` task does before publishing. Raises :class:`ValidationFailed` over the threshold.
    """
    if input is None:
        base = dataset_dir(cfg, dataset)
        inter = raw_from_frame(pd.read_parquet(base / "interactions.parquet"), "interactions",
                               base / "interactions.parquet")
        items = raw_from_frame(pd.read_parquet(base / "items.parquet"), "items", base / "items.parquet")
        catalogue = None
    else:
        inter_files, item_files = find_batch_files(Path(input))
        if not inter_files and not item_files:
            raise DataError(input, "no interactions*.csv|parquet or items*.csv|parquet files found")
        inter = read_raw_files(inter_files, "interactions") if inter_files else None
        items = read_raw_files(item_files, "items") if item_files else None
        try:
            catalogue = load_items(cfg, dataset)[S.ITEM_ID].to_numpy()
        except FileNotFoundError:
            catalogue = np.array([], dtype=np.int64)
    # The key names the checked source too, so checking another batch does not replace this one's files.
    source = "prepared" if input is None else re.sub(r"[^A-Za-z0-9_.-]", "-", Path(input).stem)
    key = key or f"{run_key(dataset, start, end)}_{source}"
    return validate_tables(cfg, dataset, inter, items, catalogue_ids=catalogue, start=start, end=end,
                           key=key).summary
