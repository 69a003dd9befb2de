"""Great Expectations validation: each kind of bad row is caught by the right expectation and quarantined."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.data import datasets as data
from learn_tasks.data import validation as V
from learn_tasks.data.raw import LINE_COL, read_raw_file, typed_interactions
from learn_tasks.data.readers import DataError
from learn_tasks.config import Settings

START, END = pd.Timestamp("2024-03-01", tz="UTC"), pd.Timestamp("2024-03-02", tz="UTC")
NOW = pd.Timestamp("2024-03-05", tz="UTC")
T_OK = int(pd.Timestamp("2024-03-01 12:00", tz="UTC").timestamp())

# (user_id, item_id, timestamp, rating) as text, and the check expected to reject the row (None = accepted)
BAD_LOGS: list[tuple[tuple[str, str, str, str], str | None]] = [
    (("1", "10", str(T_OK), "4"), None),
    (("1", "11", str(T_OK + 60), ""), None),
    (("2", "12", "2024-03-01T18:30:00Z", "5.0"), None),
    (("abc", "10", str(T_OK), "3"), "user_id_format"),  # malformed type
    (("3", "10.5", str(T_OK), "3"), "item_id_format"),
    (("", "10", str(T_OK), "3"), "user_id_present"),
    (("4", "10", "nan", "3"), "timestamp_present"),  # NaN timestamp
    (("4", "11", "yesterday", "3"), "timestamp_format"),
    (("4", "12", "2024-13-45", "3"), "timestamp_valid"),
    (("5", "10", str(int(pd.Timestamp("2031-01-01", tz="UTC").timestamp())), "3"), "timestamp_not_future"),
    (("5", "11", str(int(pd.Timestamp("2024-02-01", tz="UTC").timestamp())), "3"), "timestamp_in_interval"),
    (("6", "10", str(T_OK), "9"), "rating_range"),
    (("6", "11", str(T_OK), "great"), "rating_format"),
    (("7", "999", str(T_OK), "4"), "known_item"),  # unknown item
    (("7", "13", str(T_OK), "4"), "known_item"),  # its catalogue row has an empty title -> quarantined
    (("1", "10", str(T_OK), "4"), "duplicate_event"),  # second copy of the first row
]
# (item_id, title, price, source_id) and the expected check
BAD_ITEMS: list[tuple[tuple[str, str, str, str], str | None]] = [
    (("10", "The Rust Book", "10", "B001"), None),
    (("11", "Bread at Home", "", ""), None),
    (("12", "Orbit", "5.5", "X-12"), None),
    (("13", "   ", "3", "B013"), "title_present"),  # empty title
    (("14", "x" * 1001, "3", "B014"), "title_length"),
    (("10", "The Rust Book, again", "10", "B001"), "duplicate_item"),
    (("A15", "Odd id", "3", "B015"), "item_id_format"),
    (("16", "Cheap", "-1", "B016"), "price_range"),
    (("17", "Spaces", "1", "has space"), "source_id_format"),
]


def _write_corpus(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    logs = pd.DataFrame([r for r, _ in BAD_LOGS], columns=[S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP, S.RATING])
    items = pd.DataFrame([r for r, _ in BAD_ITEMS], columns=[S.ITEM_ID, S.TITLE, S.PRICE, S.SOURCE_ID])
    logs.to_csv(folder / "interactions.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return folder / "interactions.csv", folder / "items.csv"


def _lenient(settings: Settings) -> Settings:
    return settings.with_overrides(validate={"max_failed_share": 1.0})


def test_bad_logs_caught_by_the_right_expectation(settings: Settings, tmp_path: Path) -> None:
    inter_csv, items_csv = _write_corpus(tmp_path / "batch")
    inter = read_raw_file(inter_csv, "interactions")
    items = read_raw_file(items_csv, "items")
    out = V.validate_tables(_lenient(settings), "corpus", inter, items, catalogue_ids=np.array([], dtype=np.int64),
                            start=START, end=END, now=NOW)

    for table, corpus in (("interactions", BAD_LOGS), ("items", BAD_ITEMS)):
        res = getattr(out, table)
        # counts conserved: read = accepted + quarantined, per table
        assert res.read == len(corpus) == len(res.accepted) + len(res.quarantine)
        q = res.quarantine.set_index(S.QUARANTINE_LINE)
        for i, (_, expected) in enumerate(corpus):
            line = i + 2  # CSV line of row i (after the header)
            if expected is None:
                assert line not in q.index, (table, i, q.loc[line].to_dict() if line in q.index else None)
            else:
                assert q.loc[line, "check"] == expected, (table, i, q.loc[line].to_dict())
                assert q.loc[line, S.QUARANTINE_FILE] == str(inter_csv if table == "interactions" else items_csv)
                assert q.loc[line, "expectation"].startswith("expect_")
        assert sorted(res.accepted[LINE_COL]) == [i + 2 for i, (_, e) in enumerate(corpus) if e is None]
        summary = out.summary[table]
        assert summary["read"] == summary["accepted"] + summary["quarantined"]
        assert sum(summary["by_check"].values()) == summary["quarantined"]

    # the raw values travel with the quarantined row, so nothing is lost
    q = out.interactions.quarantine
    row = json.loads(q[q["check"] == "user_id_format"].iloc[0][S.QUARANTINE_RAW])
    assert row[S.USER_ID] == "abc" and row[S.ITEM_ID] == "10"
    # a future timestamp outside the interval reports both checks, the first one named
    fut = q[q["check"] == "timestamp_not_future"].iloc[0]
    assert "timestamp_in_interval" in fut["failed_checks"]

    # files: quarantine per table, GX results as JSON, summary, Data Docs HTML
    key = out.summary["run_key"]
    qdir = settings.paths.quarantine() / "corpus" / key
    stored = pd.read_parquet(qdir / "interactions.parquet")
    assert len(stored) == len(out.interactions.quarantine)
    assert set(V.QUARANTINE_COLUMNS) <= set(stored.columns)
    rdir = settings.paths.reports("validation") / key
    gx_json = json.loads((rdir / "interactions.json").read_text())
    assert gx_json["success"] is False and gx_json["results"]
    assert json.loads((rdir / "summary.json").read_text())["interactions"]["quarantined"] == len(stored)
    assert (rdir / "data_docs" / "index.html").exists()
    assert list((rdir / "data_docs" / "validations").rglob("*.html"))


def test_threshold_fails_batch_but_keeps_evidence(settings: Settings, tmp_path: Path) -> None:
    inter_csv, items_csv = _write_corpus(tmp_path / "batch")
    cfg = settings.with_overrides(validate={"max_failed_share": 0.2, "data_docs": False})
    with pytest.raises(V.ValidationFailed, match="interactions: 13 of 16 rows failed") as err:
        V.validate_tables(cfg, "corpus", read_raw_file(inter_csv, "interactions"),
                          read_raw_file(items_csv, "items"), catalogue_ids=np.array([], dtype=np.int64),
                          start=START, end=END, now=NOW)
    summary = err.value.summary
    assert summary["passed"] is False and summary["interactions"]["passed"] is False
    assert (Path(summary["quarantine"]) / "interactions.parquet").exists()
    assert (Path(summary["reports"]) / "summary.json").exists()


def test_typed_frames_from_parquet_round_trip(settings: Settings, tmp_path: Path) -> None:
    """Typed Parquet input (ints, UTC datetimes, a float id column with a gap) validates and converts back."""
    ts = pd.to_datetime([T_OK, T_OK + 1, T_OK + 2], unit="s", utc=True).astype("datetime64[us, UTC]")
    logs = pd.DataFrame({S.USER_ID: [1.0, 2.0, np.nan], S.ITEM_ID: [10, 11, 10], S.EVENT_TIMESTAMP: ts,
                         S.RATING: [4.0, np.nan, 2.0]})
    logs.to_parquet(tmp_path / "interactions.parquet")
    raw = read_raw_file(tmp_path / "interactions.parquet", "interactions")
    assert raw[S.USER_ID].tolist() == ["1", "2", None]
    out = V.validate_tables(_lenient(settings), "typed", raw, None, catalogue_ids=np.array([10, 11]),
                            start=START, end=END, now=NOW)
    assert out.interactions.by_check == {"user_id_present": 1}
    typed = typed_interactions(out.interactions.accepted)
    assert typed.dtypes.astype(str).to_dict() == S.INTERACTION_COLUMNS
    assert typed[S.EVENT_TIMESTAMP].tolist() == ts[:2].tolist()
    assert typed[S.USER_ID].tolist() == [1, 2]


def test_missing_required_column_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "interactions.csv"
    pd.DataFrame({S.USER_ID: [1], S.ITEM_ID: [2]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"interactions.csv: missing column\(s\) \['event_timestamp'\]"):
        read_raw_file(path, "interactions")


def test_run_checks_prepared_dataset_in_place(settings: Settings, synth_dataset: str) -> None:
    before = data.load_interactions(settings, synth_dataset)
    summary = V.validate_files(settings, synth_dataset)
    assert summary["passed"] is True
    assert summary["interactions"]["read"] == summary["interactions"]["accepted"] == len(before)
    assert summary["items"]["read"] == len(data.load_items(settings, synth_dataset))
    pd.testing.assert_frame_equal(data.load_interactions(settings, synth_dataset), before)  # nothing changed
    # a new batch checked against the dataset's catalogue: an unknown item is flagged
    batch = settings.paths.home / "incoming_test"
    batch.mkdir()
    first = before.iloc[0]
    pd.DataFrame({S.USER_ID: [first[S.USER_ID]] * 2, S.ITEM_ID: [first[S.ITEM_ID], 10**9],
                  S.EVENT_TIMESTAMP: [first[S.EVENT_TIMESTAMP]] * 2}).to_csv(batch / "interactions.csv", index=False)
    lenient = settings.with_overrides(validate={"max_failed_share": 1.0, "data_docs": False})
    summary = V.validate_files(lenient, synth_dataset, input=batch)
    assert summary["interactions"]["by_check"] == {"known_item": 1}
