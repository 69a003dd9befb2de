"""Training sequences and length-bucketed batches.

Batches group sequences of similar length (length buckets), so little time is spent on padding; the batch
order is shuffled, so the model still sees lengths in random order. Two batch shapes, one per loss family:

* dense all-action: each sequence is cut at a random point into a history (user tower) and a target part
  (item tower), with ``n_history`` sampled history positions and ``n_target`` sampled targets;
* next item: a window of up to ``max_len`` inputs and the item after each of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.pch.catalogue import Catalogue


@dataclass
class Sequences:
    """Training sequences as catalogue rows, oldest first: ``rows[offsets[i]:offsets[i+1]]`` is user i."""

    user_ids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seq(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


def build_sequences(train: pd.DataFrame, cat: Catalogue, min_events: int = 2) -> tuple[Sequences, int]:
    """Per-user training sequences with at least ``min_events`` events; returns them and the users skipped."""
    df = train.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    sizes = df.groupby(S.USER_ID, sort=True).size()
    keep = sizes[sizes >= min_events]
    df = df[df[S.USER_ID].isin(keep.index)]
    offsets = np.concatenate([[0], np.cumsum(keep.to_numpy())]).astype(np.int64)
    return Sequences(keep.index.to_numpy(np.int64), offsets, cat.rows(df[S.ITEM_ID].to_numpy())), int(len(sizes) - len(keep))


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   bucket: bool = True) -> list[np.ndarray]:
    """Batches of indices with similar lengths, in random order; every index appears exactly once.

    Indices are sorted by length (ties in random order), cut into consecutive batches, and the batch order
    is shuffled, so padding is small and the model still sees lengths in random order. ``bucket=False``:
    batches of random indices (every batch mixes short and long sequences, as SASRec trains).
    """
    lengths = np.asarray(lengths)
    order = np.lexsort((rng.random(len(lengths)), lengths)) if bucket else rng.permutation(len(lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``min(n, k)`` distinct positions of ``range(n)``, sorted."""
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


def dense_batches(seqs: Sequences, max_len: int, batch_size: int, n_history: int, n_target: int,
                  rng: np.random.Generator, bucket: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Dense all-action batches: a random cut per sequence into history (last ``max_len``) and targets."""
    n = seqs.lengths
    cut = 1 + np.floor(rng.random(len(n)) * (n - 1)).astype(np.int64)  # 1 .. n-1 history events
    hlen = np.minimum(cut, max_len)
    for idx in length_buckets(hlen, batch_size, rng, bucket):
        B, L = len(idx), int(hlen[idx].max())
        hist = np.zeros((B, L), np.int64)
        hmask = np.zeros((B, L), bool)
        hsel = np.zeros((B, n_history), np.int64)
        hvalid = np.zeros((B, n_history), bool)
        tgt = np.zeros((B, n_target), np.int64)
        tvalid = np.zeros((B, n_target), bool)
        for j, i in enumerate(idx):
            s, c, h = seqs.seq(i), cut[i], hlen[i]
            hist[j, :h] = s[c - h:c]
            hmask[j, :h] = True
            p = _sample(rng, h, n_history)
            hsel[j, :len(p)], hvalid[j, :len(p)] = p, True
            t = s[c:][_sample(rng, len(s) - c, n_target)]
            tgt[j, :len(t)], tvalid[j, :len(t)] = t, True
        # Short histories and few targets leave columns of pure padding: drop them (the loss is O(H x T)).
        H, T = max(1, int(hvalid.sum(1).max())), max(1, int(tvalid.sum(1).max()))
        yield {"hist": hist, "hist_mask": hmask, "hsel": hsel[:, :H], "hsel_valid": hvalid[:, :H],
               "tgt": tgt[:, :T], "tgt_valid": tvalid[:, :T]}


def next_item_batches(seqs: Sequences, max_len: int, batch_size: int,
                      rng: np.random.Generator, bucket: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Next-item batches: a window of up to ``max_len`` inputs and their next items (random window start)."""
    n = seqs.lengths
    w = np.minimum(n - 1, max_len)
    start = np.floor(rng.random(len(n)) * (n - 1 - w + 1)).astype(np.int64)
    for idx in length_buckets(w, batch_size, rng, bucket):
        B, L = len(idx), int(w[idx].max())
        inp = np.zeros((B, L), np.int64)
        out = np.zeros((B, L), np.int64)
        mask = np.zeros((B, L), bool)
        for j, i in enumerate(idx):
            s = seqs.seq(i)[start[i]:start[i] + w[i] + 1]
            inp[j, :w[i]], out[j, :w[i]], mask[j, :w[i]] = s[:-1], s[1:], True
        yield {"inp": inp, "out": out, "mask": mask}
