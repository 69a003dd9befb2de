"""Data layer: every reader, both splits, bad input, fetch, stats and the CLI contract."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from learn_tasks import schema as S
from learn_tasks.data import datasets as data
from learn_tasks.data import public, splits, synth
from learn_tasks.data.readers import DataError
from learn_tasks.data.stats import dataset_stats
from learn_tasks.cli import app
from learn_tasks.config import Settings, load_settings

runner = CliRunner()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def seqrec_dir(tmp_path: Path, inter: str, items: str) -> Path:
    d = tmp_path / "src"
    write(d / "interactions.csv", inter)
    write(d / "items.csv", items)
    return d


ITEMS = '"item_id","title"\n1,"Dune"\n2,"Emma &amp; Friends"\n3,"Ulysses"\n'


# ---------------------------------------------------------------------------------------------- readers
def test_seqrec_reader_canonical_types_and_unescape(settings: Settings, tmp_path: Path) -> None:
    src = seqrec_dir(tmp_path, "user_id,item_id,timestamp\n7,2,1000\n7,1,1000\n7,3,900\n8,1,2000\n", ITEMS)
    m = data.prepare_dataset(settings, "seqrec", src, "t")
    assert (m["interactions"], m["users"], m["items"], m["quarantined"]) == (4, 2, 3, 0)
    inter = data.load_interactions(settings, "t")
    assert str(inter[S.EVENT_TIMESTAMP].dtype) == "datetime64[us, UTC]"
    assert inter[S.USER_ID].dtype == np.int64 and inter[S.ITEM_ID].dtype == np.int64
    # sorted by time per user, ties keep file order (item 2 before item 1 at t=1000)
    assert inter[inter[S.USER_ID] == 7][S.ITEM_ID].tolist() == [3, 2, 1]
    items = data.load_items(settings, "t")
    assert items.set_index(S.ITEM_ID).loc[2, S.TITLE] == "Emma & Friends"
    assert list(items.columns[: len(S.ITEM_COLUMNS)]) == list(S.ITEM_COLUMNS)


def test_amazon2014_raw_formats(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "raw"
    write(d / "ratings_Books.csv", "A1,B001,5.0,1300000000\nA2,B002,3.0,1300000100\nA1,B002,4.0,1300000200\n")
    meta = (
        "{'asin': 'B001', 'title': 'Cats &amp; Dogs', 'categories': [['Books', 'Pets']], 'brand': 'Acme', 'price': 9.5}\n"
        "{'asin': 'B002', 'description': 'A long tale', 'categories': [['Books']], 'salesRank': {'Books': 3}}\n"
        "this is not a literal\n"
    )
    with gzip.open(d / "meta_Books.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(meta)
    m = data.prepare_dataset(settings, "amazon2014", d, "amz")
    assert (m["interactions"], m["users"], m["items"], m["quarantined"]) == (3, 2, 2, 1)
    items = data.load_items(settings, "amz").set_index(S.SOURCE_ID)
    assert items.loc["B001", S.TITLE] == "Cats & Dogs"
    assert items.loc["B001", S.CATEGORY] == "Books, Pets" and items.loc["B001", S.BRAND] == "Acme"
    assert items.loc["B001", S.PRICE] == 9.5
    assert items.loc["B002", S.DESCRIPTION] == "A long tale" and pd.isna(items.loc["B002", S.TITLE])
    users = pd.read_parquet(settings.paths.dataset("amz") / "users.parquet")
    assert sorted(users[S.SOURCE_ID]) == ["A1", "A2"]
    q = pd.read_parquet(settings.paths.dataset("amz") / "quarantine.parquet")
    assert q[S.QUARANTINE_LINE].tolist() == [3] and "meta_Books" in q[S.QUARANTINE_FILE][0]
    assert m["rows_read"] == m["rows_kept"] + m["quarantined"]


def test_amazon2014_reviews_json_when_no_ratings(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "raw"
    lines = [{"reviewerID": "U1", "asin": "X1", "overall": 4.0, "unixReviewTime": 1300000000},
             {"reviewerID": "U1", "asin": "X2", "overall": 2.0, "unixReviewTime": 1300000500},
             {"reviewerID": "U2", "asin": "X1"}]  # no time: quarantined
    d.mkdir(parents=True)
    with gzip.open(d / "reviews_Books_5.json.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(x) for x in lines) + "\n")
    m = data.prepare_dataset(settings, "amazon2014", d, "rev")
    assert m["interactions"] == 2 and m["quarantined"] == 1
    inter = data.load_interactions(settings, "rev")
    assert set(inter[S.EVENT_TYPE]) == {"review"}
    q = pd.read_parquet(settings.paths.dataset("rev") / "quarantine.parquet")
    assert q[S.QUARANTINE_FIELD].tolist() == ["unixReviewTime"] and q[S.QUARANTINE_LINE].tolist() == [3]


def test_movielens_reader_with_tags_and_crlf(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "ml"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\r\n1,10,4.0,964982703\r\n1,20,3.5,964982800\r\n2,10,5.0,964982900\r\n")
    write(d / "movies.csv", 'movieId,title,genres\r\n10,"Heat (1995)",Action|Crime\r\n20,Toy Story (1995),(no genres listed)\r\n')
    write(d / "tags.csv", "userId,movieId,tag,timestamp\r\n1,10,Gritty,964982703\r\n2,10,gritty,964982703\r\n2,10,heist,964982704\r\n")
    m = data.prepare_dataset(settings, "movielens", d, "ml")
    assert (m["interactions"], m["users"], m["items"]) == (3, 2, 2)
    items = data.load_items(settings, "ml").set_index(S.ITEM_ID)
    assert items.loc[10, S.CATEGORY] == "Action, Crime" and pd.isna(items.loc[20, S.CATEGORY])
    assert items.loc[10, S.ATTRIBUTES] == "tags: gritty, heist"
    assert data.load_interactions(settings, "ml")[S.RATING].tolist() == [4.0, 3.5, 5.0]


def test_canonical_reader(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "canon"
    d.mkdir()
    pd.DataFrame({S.USER_ID: [1, 1], S.ITEM_ID: [5, 6],
                  S.EVENT_TIMESTAMP: ["2020-01-01T00:00:00Z", "not a time"]}).to_csv(d / "interactions.csv", index=False)
    pd.DataFrame({S.ITEM_ID: [5, 6], S.TITLE: ["a", "b"]}).to_parquet(d / "items.parquet")
    m = data.prepare_dataset(settings, "canonical", d, "c")
    assert m["interactions"] == 1 and m["quarantined"] == 1
    q = pd.read_parquet(settings.paths.dataset("c") / "quarantine.parquet")
    assert q[S.QUARANTINE_FIELD].tolist() == [S.EVENT_TIMESTAMP] and q[S.QUARANTINE_LINE].tolist() == [3]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "inter, field, reason",
    [
        ("user_id,item_id,timestamp\n1,1,100\n1,2,100,9\n", "*", "expected 3 fields"),
        ("user_id,item_id,timestamp\n1,1,100\n1,x,100\n", "item_id", "not an integer"),
        ("user_id,item_id,timestamp\n1,1,100\n1,2,1.5e12\n", "timestamp", "unix timestamp"),
        ("user_id,item_id,timestamp\n1,1,100\n,2,100\n", "user_id", "integer"),
        (b"user_id,item_id,timestamp\n1,1,100\n1,2\xff,100\n", "*", "non-UTF-8"),
    ],
)
def test_bad_rows_are_quarantined_with_line_and_field(settings: Settings, tmp_path: Path, inter, field, reason) -> None:
    src = tmp_path / "src"
    write(src / "interactions.csv", inter)
    write(src / "items.csv", ITEMS)
    m = data.prepare_dataset(settings, "seqrec", src, "bad")
    assert m["quarantined"] == 1 and m["interactions"] == 1
    assert m["rows_read"] == m["rows_kept"] + m["quarantined"]
    q = pd.read_parquet(settings.paths.dataset("bad") / "quarantine.parquet").iloc[0]
    assert q[S.QUARANTINE_LINE] == 3 and q[S.QUARANTINE_FIELD] == field and reason in q[S.QUARANTINE_REASON]
    assert q[S.QUARANTINE_FILE].endswith("interactions.csv") and q[S.QUARANTINE_RAW]


def test_missing_column_and_empty_file_fail_naming_the_file(settings: Settings, tmp_path: Path) -> None:
    src = seqrec_dir(tmp_path, "user_id,timestamp\n1,100\n", ITEMS)
    with pytest.raises(DataError, match=r"interactions.csv, line 1: missing column\(s\) \['item_id'\]"):
        data.prepare_dataset(settings, "seqrec", src, "x")
    write(src / "interactions.csv", "")
    with pytest.raises(DataError, match="interactions.csv: file is empty"):
        data.prepare_dataset(settings, "seqrec", src, "x")


def test_mostly_garbage_fails_instead_of_quarantining_everything(settings: Settings, tmp_path: Path) -> None:
    src = seqrec_dir(tmp_path, "user_id,item_id,timestamp\n" + "a,b,c\n" * 10 + "1,1,5\n", ITEMS)
    with pytest.raises(DataError, match="rows are malformed"):
        data.prepare_dataset(settings, "seqrec", src, "x")


def test_duplicate_items_and_unknown_item_events_are_quarantined(settings: Settings, tmp_path: Path) -> None:
    src = seqrec_dir(tmp_path, "user_id,item_id,timestamp\n1,1,100\n1,99,200\n",
                     '"item_id","title"\n1,"A"\n1,"A again"\n2,"B"\n')
    m = data.prepare_dataset(settings, "seqrec", src, "d")
    q = pd.read_parquet(settings.paths.dataset("d") / "quarantine.parquet")
    assert sorted(q[S.QUARANTINE_REASON]) == ["duplicate item id (first kept)", "event for an item not in the catalogue"]
    assert m["items"] == 2 and m["interactions"] == 1
    assert data.load_items(settings, "d").set_index(S.ITEM_ID).loc[1, S.TITLE] == "A"


# ---------------------------------------------------------------------------------------------- splits
def test_loo_split_has_no_leakage(settings: Settings, synth_dataset: str) -> None:
    df = splits.load_split(settings, synth_dataset, S.PROTOCOL_LOO)
    for _, g in df.groupby(S.USER_ID):
        test, valid, train = (g[g[S.SPLIT] == s] for s in (S.TEST, S.VALID, S.TRAIN))
        assert len(test) == 1 and len(valid) == 1
        assert test[S.EVENT_TIMESTAMP].iloc[0] >= train[S.EVENT_TIMESTAMP].max()
        assert valid[S.EVENT_TIMESTAMP].iloc[0] >= train[S.EVENT_TIMESTAMP].max()
        assert g.index[-1] == test.index[0]  # the last event by time is the test event


def test_loo_short_users() -> None:
    t = pd.Timestamp("2020-01-01", tz="UTC")
    inter = pd.DataFrame({S.USER_ID: [1, 2, 2], S.ITEM_ID: [1, 1, 2],
                          S.EVENT_TIMESTAMP: [t, t, t + pd.Timedelta("1D")]})
    df = splits.split_loo(inter)
    assert df[S.SPLIT].tolist() == [S.TRAIN, S.TRAIN, S.TEST]


def test_temporal_split_cutoff_and_cold_start(settings: Settings, synth_dataset: str) -> None:
    df = splits.load_split(settings, synth_dataset, S.PROTOCOL_TEMPORAL)
    cut = pd.Timestamp(df.attrs["test_cutoff"])
    assert (df.loc[df[S.SPLIT] != S.TEST, S.EVENT_TIMESTAMP] < cut).all()
    assert (df.loc[df[S.SPLIT] == S.TEST, S.EVENT_TIMESTAMP] >= cut).all()
    vcut = pd.Timestamp(df.attrs["valid_cutoff"])
    assert (df.loc[df[S.SPLIT] == S.TRAIN, S.EVENT_TIMESTAMP] < vcut).all() and vcut <= cut
    st = dataset_stats(settings, synth_dataset)
    # the generator keeps 5% of items out of the first 90% of time: they are cold-start under split B
    assert st["cold_start_items"] > 0
    assert st["interactions"] == len(df)


def test_temporal_explicit_cutoff(settings: Settings, synth_dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEARN_DATA__TEMPORAL_CUTOFF", "2020-12-01")
    cfg = load_settings()
    df = splits.load_split(cfg, synth_dataset, S.PROTOCOL_TEMPORAL)
    assert df.attrs["test_cutoff"].startswith("2020-12-01")
    assert (df.loc[df[S.SPLIT] == S.TEST, S.EVENT_TIMESTAMP] >= pd.Timestamp("2020-12-01", tz="UTC")).all()


def test_kcore_filter() -> None:
    t = pd.Timestamp("2020-01-01", tz="UTC")
    inter = pd.DataFrame({S.USER_ID: [1, 1, 2, 2, 3], S.ITEM_ID: [1, 2, 1, 2, 1], S.EVENT_TIMESTAMP: [t] * 5})
    out = data.kcore(inter, 2)
    assert sorted(out[S.USER_ID].unique()) == [1, 2] and len(out) == 4


# ---------------------------------------------------------------------------------------------- fetch
def test_fetch_from_mirror_checks_sha256(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    write(mirror / "movielens-latest-small" / "ratings.csv", "tampered\n")
    write(mirror / "movielens-latest-small" / "movies.csv", "x\n")
    write(mirror / "movielens-latest-small" / "tags.csv", "x\n")
    monkeypatch.setenv("LEARN_DATA_MIRROR", str(mirror))
    with pytest.raises(DataError, match="sha256 mismatch"):
        public.fetch_dataset(load_settings(), "movielens-latest-small")


def test_fetch_without_mirror_gives_clear_offline_error(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEARN_DATA_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setattr(public, "_download", lambda url, dest, t: (_ for _ in ()).throw(
        DataError(url, "download failed (offline); no network? Set LEARN_DATA_MIRROR to a local copy")))
    with pytest.raises(DataError, match="LEARN_DATA_MIRROR"):
        public.fetch_dataset(load_settings(), "movielens-latest-small")


def test_download_error_names_url(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed"):
        public._download("http://127.0.0.1:9/none.zip", tmp_path / "x.zip", timeout_s=2)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "datasets").is_dir(), reason="no shared data")
def test_fetch_and_prepare_movielens_from_shared_mirror(settings: Settings) -> None:
    info = public.fetch_dataset(settings, "movielens-latest-small")
    assert info["source"].startswith("mirror:")
    m = data.prepare_dataset(settings, "movielens", info["path"], "ml")
    assert m["interactions"] == 100_836 and m["users"] == 610 and m["quarantined"] == 0


# ---------------------------------------------------------------------------------------------- config + CLI
def test_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    y = write(tmp_path / "c.yaml", "train:\n  epochs: 7\n  lr: 0.5\n")
    monkeypatch.setenv("LEARN_TRAIN__LR", "0.25")
    cfg = load_settings(files=[y], overrides=["train.batch_size=32"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (7, 0.25, 32)
    with pytest.raises(Exception, match="nonexistent"):
        load_settings(overrides=["train.nonexistent=1"])


def test_cli_prepare_and_stats_json(settings: Settings, tmp_path: Path) -> None:
    src = synth.write_seqrec(tmp_path / "s", synth.SynthSpec(n_users=50, n_items=60))
    r = runner.invoke(app, ["data", "prepare", "--format", "seqrec", "--input", str(src), "--name", "s", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "stats", "s", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    for key in ("interactions", "users", "items", "quarantined", "cold_start_items", "new_users"):
        assert key in st
    assert st["users"] == 50


def test_cli_malformed_input_exits_nonzero_naming_file_and_line(settings: Settings, tmp_path: Path) -> None:
    src = seqrec_dir(tmp_path, "user_id,item_id,timestamp\n1,1,100\n\"unterminated,2,3\n", ITEMS)
    r = runner.invoke(app, ["data", "prepare", "--format", "seqrec", "--input", str(src), "--name", "m"])
    if r.exit_code == 0:  # the row was quarantined instead: it must be counted
        st = json.loads(runner.invoke(app, ["data", "stats", "m", "--json"]).output)
        assert st["quarantined"] >= 1
    else:
        assert "interactions.csv" in r.output and "line" in r.output
