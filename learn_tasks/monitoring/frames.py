"""Windows of the temporal split and the frames the Evidently reports read.

* :func:`windows`: the reference (training) window, the current window, the stretch of the reference as
  long as the current window (user activity) and the history up to the window end (sequence lengths).
* :func:`item_table`: per item, training popularity and slice flags (the same definition as evaluation).
* :func:`event_frame` (a row per event) and :func:`user_frame` (a row per active user).
* :func:`content_frames`: content embeddings of the window's new items and of a catalogue sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.ceg import store
from learn_tasks.config import Settings
from learn_tasks.pch import catalogue


@dataclass
class Windows:
    reference: pd.DataFrame  # training events before the current window (defines slices)
    current: pd.DataFrame  # events in [start, end)
    recent: pd.DataFrame  # the last stretch of the reference as long as the current window (activity)
    history: pd.DataFrame  # every event before the current window end (sequence lengths)
    start: pd.Timestamp
    end: pd.Timestamp
    reference_end: pd.Timestamp
    recent_start: pd.Timestamp


def windows(split: pd.DataFrame, current_start: str | None = None, current_end: str | None = None) -> Windows:
    """Reference (training) and current windows of a temporal split; see :mod:`learn_tasks.monitoring.monitor`."""
    ts = split[S.EVENT_TIMESTAMP]
    test_cut = split.attrs.get("test_cutoff")
    if current_start is not None:
        start = S.to_utc(current_start)
    elif test_cut:
        start = S.to_utc(test_cut)
    else:
        test = ts[split[S.SPLIT] == S.TEST]
        start = test.min() if len(test) else ts.max()
    end = S.to_utc(current_end) if current_end is not None else ts.max() + pd.Timedelta(seconds=1)
    if end <= start:
        raise ValueError(f"current window is empty: end {end} is not after start {start}")
    reference = split[(split[S.SPLIT] == S.TRAIN) & (ts < start)]
    current = split[(ts >= start) & (ts < end)]
    history = split[ts < end]
    ref_end = reference[S.EVENT_TIMESTAMP].max() + pd.Timedelta(seconds=1) if len(reference) else start
    recent_start = ref_end - (end - start)
    recent = reference[reference[S.EVENT_TIMESTAMP] >= recent_start]
    return Windows(reference, current, recent, history, start, end, ref_end, recent_start)


def item_table(reference: pd.DataFrame, item_ids: np.ndarray, tail_share: float) -> pd.DataFrame:
    """Per item: training popularity and slice flags (the same definition as evaluation)."""
    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    pop = catalogue.item_popularity(reference, ids)
    tail = catalogue.tail_mask(pop, tail_share)
    return pd.DataFrame({S.POPULARITY: pop, S.IS_COLD_START: pop == 0, S.IS_LONG_TAIL: tail,
                         "is_head": (pop > 0) & ~tail}, index=pd.Index(ids, name=S.ITEM_ID))


def event_frame(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per event: cold-start flag; long-tail / head flags and log popularity on warm items only.

    Long-tail and head are NaN on cold-start events, so their means are shares *among warm events*: a
    surge of new items moves the cold-start share, not the long-tail share.
    """
    it = items.reindex(events[S.ITEM_ID].to_numpy())
    cold = it[S.IS_COLD_START].astype("boolean").fillna(True).to_numpy(bool)
    warm = ~cold
    return pd.DataFrame({
        "is_cold_start": cold.astype(float),
        "is_long_tail": np.where(warm, it[S.IS_LONG_TAIL].astype("boolean").fillna(False).to_numpy(float), np.nan),
        "is_head": np.where(warm, it["is_head"].astype("boolean").fillna(False).to_numpy(float), np.nan),
        "log_popularity": np.where(warm, np.log1p(it[S.POPULARITY].fillna(0).to_numpy(float)), np.nan),
    })


def user_frame(window: pd.DataFrame, history: pd.DataFrame, known_users: np.ndarray,
               cold_user_max_events: int, training: pd.DataFrame) -> pd.DataFrame:
    """One row per user active in ``window``: events in it, sequence length, new / cold user flags.

    ``history`` holds every event up to the window end (sequence length = what the model would see);
    ``known_users`` are the users with events before the window; ``training`` gives training counts.
    """
    if window.empty:
        return pd.DataFrame(columns=["events_in_window", "sequence_length", "is_new_user", "is_cold_user"])
    counts = window.groupby(S.USER_ID).size()
    users = counts.index.to_numpy()
    seq = history[history[S.USER_ID].isin(users)].groupby(S.USER_ID).size().reindex(users, fill_value=0)
    train_n = training[training[S.USER_ID].isin(users)].groupby(S.USER_ID).size().reindex(users, fill_value=0)
    return pd.DataFrame({
        "events_in_window": counts.to_numpy(float),
        "sequence_length": seq.to_numpy(float),
        "is_new_user": (~np.isin(users, known_users)).astype(float),
        "is_cold_user": (train_n.to_numpy() <= cold_user_max_events).astype(float),
    }, index=pd.Index(users, name=S.USER_ID)).reset_index(drop=True)


def sample_rows(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` rows of ``df`` (a seeded sample; ``n = 0`` keeps all), so drift stays fast on two cores."""
    return df.sample(n, random_state=seed) if n and len(df) > n else df


def content_frames(cfg: Settings, dataset: str, w: Windows, items: pd.DataFrame,
                   embeddings: tuple[np.ndarray, np.ndarray] | None, notes: list[str]):
    """(new items of the window, catalogue sample) embedding frames, or None with a note saying why.

    ``embeddings`` = ``(item_ids, vectors)``; None reads the current version of the CEG store.
    """
    mc = cfg.monitor
    if embeddings is None:
        try:
            embeddings = store.load_embeddings(cfg, dataset)
        except FileNotFoundError as exc:
            notes.append(f"content embeddings: {exc}; embedding drift left out")
            return None
    ids, emb = np.asarray(embeddings[0], dtype=np.int64), np.asarray(embeddings[1], dtype=np.float32)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"content embeddings of {dataset!r}: {len(ids)} ids but an array of shape {emb.shape}")
    cur_items = np.unique(w.current[S.ITEM_ID].to_numpy(np.int64))
    new = cur_items[items[S.IS_COLD_START].reindex(cur_items).astype("boolean").fillna(True).to_numpy(bool)]
    warm = items.index[~items[S.IS_COLD_START].to_numpy(bool)].to_numpy()
    has = pd.Series(np.arange(len(ids)), index=ids)
    new_rows = has.reindex(new).dropna().to_numpy(np.int64)
    ref_rows = has.reindex(warm).dropna().to_numpy(np.int64)
    missing = len(new) - len(new_rows)
    if missing:
        notes.append(f"content embeddings: {missing} of {len(new)} new item(s) are not encoded yet")
    if len(new_rows) < mc.embedding_min_items or len(ref_rows) < mc.embedding_min_items:
        notes.append(f"content embeddings: {len(new_rows)} encoded new item(s) and {len(ref_rows)} catalogue "
                     f"item(s); at least {mc.embedding_min_items} of each are needed; embedding drift left out")
        return None
    rng = np.random.default_rng(mc.seed)
    if len(new_rows) > mc.embedding_max_current:
        new_rows = rng.choice(new_rows, mc.embedding_max_current, replace=False)
    if len(ref_rows) > mc.embedding_max_reference:
        ref_rows = rng.choice(ref_rows, mc.embedding_max_reference, replace=False)
    cols = [f"e{i}" for i in range(emb.shape[1])]
    return pd.DataFrame(emb[np.sort(new_rows)], columns=cols), pd.DataFrame(emb[np.sort(ref_rows)], columns=cols)
