"""Train / validation / test splits of a prepared dataset, cached next to it.

* ``loo``  leave-one-out per user in time order (last event test, second-to-last validation), the
  protocol of the HSTU and LEARN papers' Amazon Books tables;
* ``temporal`` a global cut-off: events after it are test, so items first seen after it are genuinely
  cold-start and users first seen after it are new users. No look-ahead: a k-core filter
  (``data.split_kcore``) is computed here on the training period only (events before the validation
  cut-off); events outside it are marked ``dropped`` (kept in the frame, used by no model), and later
  events are never filtered, so whether an item or user is kept never depends on what happens after a
  cut-off. (A filter applied when preparing, ``data.kcore``, sees the whole timeline: avoid it for
  temporal evaluation.)

:func:`load_split` returns the interactions with a ``split`` column, cached under
``$LEARN_HOME/data/<name>/splits/<protocol>.parquet`` and recomputed when the split settings change.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data.datasets import canonical_interactions, dataset_dir, kcore, load_interactions
from learn_tasks.storage import read_json, write_json, write_parquet


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
    """(validation cut-off, test cut-off): ``data.temporal_cutoff`` if set, else event-time quantiles."""
    ts = inter[S.EVENT_TIMESTAMP]
    if cfg.data.temporal_cutoff:
        test_cut = S.to_utc(cfg.data.temporal_cutoff)
        valid_cut = ts[ts < test_cut].quantile(cfg.data.temporal_valid_quantile / cfg.data.temporal_test_quantile)
    else:
        test_cut = ts.quantile(cfg.data.temporal_test_quantile)
        valid_cut = ts.quantile(cfg.data.temporal_valid_quantile)
    if cfg.data.temporal_valid_cutoff:
        valid_cut = pd.Timestamp(cfg.data.temporal_valid_cutoff)
        valid_cut = valid_cut.tz_localize("UTC") if valid_cut.tzinfo is None else valid_cut.tz_convert("UTC")
    if valid_cut > test_cut:
        raise ValueError(f"the validation cut-off {valid_cut} is after the test cut-off {test_cut}")
    # Amazon timestamps are whole days: snap cut-offs to the next midnight so a day is never split.
    return valid_cut.ceil("D"), test_cut.ceil("D")


def split_temporal(inter: pd.DataFrame, cfg: Settings) -> pd.DataFrame:
    """Global cut-offs: train < valid_cut <= valid < test_cut <= test.

    With ``data.split_kcore`` = k > 1, training events outside the iterative k-core of the training events
    alone become ``dropped``; validation and test events are never filtered.
    """
    inter = canonical_interactions(inter)
    valid_cut, test_cut = temporal_cutoffs(inter, cfg)
    ts = inter[S.EVENT_TIMESTAMP]
    split = np.where(ts >= test_cut, S.TEST, np.where(ts >= valid_cut, S.VALID, S.TRAIN)).astype(object)
    k = cfg.data.split_kcore
    if k > 1:
        train = inter[split == S.TRAIN].assign(_row=np.flatnonzero(split == S.TRAIN))
        kept = kcore(train.reset_index(drop=True), k)["_row"].to_numpy()
        dropped = np.setdiff1d(np.flatnonzero(split == S.TRAIN), kept)
        split[dropped] = S.DROPPED
    inter[S.SPLIT] = pd.array(split, dtype="string")
    inter.attrs["valid_cutoff"], inter.attrs["test_cutoff"] = str(valid_cut), str(test_cut)
    inter.attrs["split_kcore"] = int(k)
    return inter


def load_split(cfg: Settings, name: str, protocol: str) -> pd.DataFrame:
    """The dataset's interactions with a ``split`` column, cached under ``splits/<protocol>.parquet``."""
    if protocol not in S.PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {S.PROTOCOLS}")
    dataset_dir(cfg, name)  # a clear error when the dataset is not prepared
    path = cfg.paths.dataset_splits(name) / f"{protocol}.parquet"
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
            "vq": d.temporal_valid_quantile, **({"split_kcore": d.split_kcore} if d.split_kcore > 1 else {}),
            **({"valid_cutoff": d.temporal_valid_cutoff} if d.temporal_valid_cutoff else {})}


def split_dataset(cfg: Settings, name: str, protocol: str) -> dict[str, Any]:
    """Compute (or reuse) a split and report its row count per split and its cut-offs (`learn data split`)."""
    df = load_split(cfg, name, protocol)
    counts = df[S.SPLIT].value_counts().to_dict()
    return {"dataset": name, "protocol": protocol, **{k: int(v) for k, v in counts.items()}, **df.attrs}
