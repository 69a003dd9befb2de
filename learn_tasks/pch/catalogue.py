"""The item catalogue the towers read: item ids, frozen content embeddings, the ID vocab and popularity.

A :class:`Catalogue` is built from the prepared data (every item of the catalogue or of the interactions)
and the CEG embedding store, aligned by row. Building one never starts encoding: items missing from the
store raise :class:`MissingContent` (training decides whether to encode them, see
``train.encode_missing``). The item slices used by evaluation and monitoring are defined here once:
``cold_start`` (0 training interactions), ``long_tail`` (the least popular warm items that together hold
``tail_share`` of training interactions) and ``head`` (the other warm items).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.ceg import store
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.storage import read_json

log = logging.getLogger("learn.catalogue")


# ==================================================================================================
# Popularity and item slices
# ==================================================================================================
def item_popularity(train_interactions: pd.DataFrame, all_item_ids: np.ndarray) -> np.ndarray:
    """Training interaction count of every item in ``all_item_ids`` (sorted ascending), int64."""
    counts = train_interactions[S.ITEM_ID].value_counts()
    return counts.reindex(np.asarray(all_item_ids), fill_value=0).to_numpy(np.int64)


def tail_mask(popularity: np.ndarray, tail_share: float) -> np.ndarray:
    """Long-tail members: the least popular warm items that together hold ``tail_share`` of interactions.

    Warm items are taken in ascending popularity (ties in the given order) while the running total
    stays within ``tail_share`` of all training interactions.
    """
    popularity = np.asarray(popularity)
    warm = np.flatnonzero(popularity > 0)
    order = warm[np.argsort(popularity[warm], kind="stable")]
    cum = np.cumsum(popularity[order])
    mask = np.zeros(len(popularity), dtype=bool)
    mask[order[cum <= tail_share * popularity.sum()]] = True
    return mask


def item_slices(train_interactions: pd.DataFrame, all_item_ids: np.ndarray, tail_share: float) -> dict[str, np.ndarray]:
    """Item ids of each slice: ``cold_start`` (0 training interactions), ``long_tail`` and ``head``."""
    ids = np.sort(np.asarray(all_item_ids, dtype=np.int64))
    pop = item_popularity(train_interactions, ids)
    tail = tail_mask(pop, tail_share)
    return {S.SLICE_COLD_START: ids[pop == 0], S.SLICE_LONG_TAIL: ids[tail], S.SLICE_HEAD: ids[(pop > 0) & ~tail]}


# ==================================================================================================
# Catalogue: item ids, frozen content embeddings, ID vocab and popularity, aligned by row
# ==================================================================================================
@dataclass
class Catalogue:
    item_ids: np.ndarray  # [N] int64, sorted ascending; a "row" below is a position in this array
    content: np.ndarray | None  # [N, d_in] float32, or None for ID-only models
    item_idx: np.ndarray  # [N] int64 row of the model's ID vocab, 0 = unknown (unseen in training)
    popularity: np.ndarray  # [N] int64 training interactions
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, len(self.item_ids) - 1)
        bad = self.item_ids[pos] != item_ids
        if bad.any():
            missing = np.unique(item_ids[bad])
            raise ValueError(f"{len(missing)} item id(s) not in the catalogue, e.g. {missing[:10].tolist()}")
        return pos

    def vocab_frame(self, tail_share: float) -> pd.DataFrame:
        """The ``items.parquet`` a checkpoint carries: item_id -> item_idx, popularity and slice flags."""
        tail = tail_mask(self.popularity, tail_share)
        return pd.DataFrame({S.ITEM_ID: self.item_ids, "item_idx": self.item_idx, S.POPULARITY: self.popularity,
                             S.IS_COLD_START: self.popularity == 0, S.IS_LONG_TAIL: tail})


class MissingContent(ValueError):
    """Some catalogue items have no content embedding in the store (``item_ids`` lists them)."""

    def __init__(self, message: str, item_ids: np.ndarray):
        super().__init__(message)
        self.item_ids = item_ids


def catalogue_item_ids(cfg: Settings, dataset: str, interactions: pd.DataFrame) -> np.ndarray:
    """Every item of the dataset's catalogue or of ``interactions``, sorted ascending."""
    items = data.load_items(cfg, dataset)
    return np.union1d(items[S.ITEM_ID].to_numpy(np.int64), interactions[S.ITEM_ID].to_numpy(np.int64))


def load_content(cfg: Settings, dataset: str, item_ids: np.ndarray,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                 fingerprint: str | None = None) -> tuple[np.ndarray, str | None]:
    """Content embeddings for ``item_ids`` (in that order) from the CEG store, or from ``embeddings``.

    Returns them with the store's embedding version (None for given ``embeddings``). Items missing from
    the store raise :class:`MissingContent` listing them; nothing is encoded here.
    """
    if embeddings is None:
        try:
            emb_ids, emb = store.load_embeddings(cfg, dataset, fingerprint)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no content embeddings for dataset {dataset!r} ({exc}); "
                                    f"run `learn encode --dataset {dataset}` first") from exc
        fingerprint = fingerprint or store.current_fingerprint(cfg, dataset)
    else:
        emb_ids, emb = embeddings
    emb_ids = np.asarray(emb_ids, dtype=np.int64)
    order = np.argsort(emb_ids, kind="stable")
    emb_ids, emb = emb_ids[order], np.asarray(emb, dtype=np.float32)[order]
    pos = np.clip(np.searchsorted(emb_ids, item_ids), 0, max(len(emb_ids) - 1, 0))
    missing = item_ids[(emb_ids[pos] != item_ids) if len(emb_ids) else np.ones(len(item_ids), bool)]
    if len(missing):
        raise MissingContent(
            f"{len(missing)} item(s) of dataset {dataset!r} have no content embedding "
            f"(fingerprint {fingerprint}), e.g. item_id {missing[:20].tolist()}; run `learn encode --dataset "
            f"{dataset}` (or set train.encode_missing=true)", missing)
    return emb[pos], fingerprint


# ==================================================================================================
# Catalogues for training, baselines and trained checkpoints
# ==================================================================================================
def training_catalogue(cfg: Settings, dataset: str, split: pd.DataFrame, needs_content: bool,
                       embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                       fit: tuple[str, ...] = (S.TRAIN,)) -> Catalogue:
    """The catalogue a new model trains on; its ID vocab holds the items seen in training (1..n, 0 = unknown).

    ``fit`` names the splits the model is fitted on (train, or train + valid for a refit before test).
    """
    train = split[split[S.SPLIT].isin(fit)]
    ids = catalogue_item_ids(cfg, dataset, split)
    pop = item_popularity(train, ids)
    item_idx = np.zeros(len(ids), np.int64)
    item_idx[pop > 0] = np.arange(1, int((pop > 0).sum()) + 1)
    content, fp = (None, None)
    if needs_content:
        content, fp = load_content(cfg, dataset, ids, embeddings)
        if not np.isfinite(content).all():
            bad = ids[~np.isfinite(content).all(1)]
            raise ValueError(f"non-finite content embeddings for {len(bad)} item(s), e.g. {bad[:10].tolist()}")
    return Catalogue(ids, content, item_idx, pop, fp)


def baseline_catalogue(cfg: Settings, dataset: str, split: pd.DataFrame, needs_content: bool,
                       embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                       known: pd.DataFrame | None = None) -> Catalogue:
    """The catalogue of a training-free baseline (no ID vocab); popularity counts the ``known`` events
    (default: the train split)."""
    known = split[split[S.SPLIT] == S.TRAIN] if known is None else known
    ids = catalogue_item_ids(cfg, dataset, split)
    content, fp = load_content(cfg, dataset, ids, embeddings) if needs_content else (None, None)
    return Catalogue(ids, content, np.zeros(len(ids), np.int64), item_popularity(known, ids), fp)


def checkpoint_vocab(run_dir: Path, item_ids: np.ndarray) -> np.ndarray:
    """The ID vocab rows a checkpoint gave ``item_ids`` (items it never saw get 0 = unknown)."""
    return _checkpoint_column(run_dir, item_ids, "item_idx")


def _checkpoint_column(run_dir: Path, item_ids: np.ndarray, column: str) -> np.ndarray:
    vocab = pd.read_parquet(Path(run_dir) / "items.parquet")
    values = pd.Series(vocab[column].to_numpy(), index=vocab[S.ITEM_ID].to_numpy())
    return values.reindex(item_ids, fill_value=0).to_numpy(np.int64)


def checkpoint_catalogue(cfg: Settings, dataset: str, run_dir: Path, split: pd.DataFrame, needs_content: bool,
                         embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> Catalogue:
    """The current catalogue with the checkpoint's ID vocab (items it never saw get 0 = unknown) and its
    training popularity (the events of the splits it was fitted on).

    Content comes from ``embeddings`` when given, else from the store at the checkpoint's own embedding
    version while the store still has it (the current one otherwise).
    """
    ids = catalogue_item_ids(cfg, dataset, split)
    idx = checkpoint_vocab(run_dir, ids)
    content, fp = (None, None)
    if needs_content and embeddings is not None:
        content, fp = load_content(cfg, dataset, ids, embeddings)
    elif needs_content:
        fp = read_json(Path(run_dir) / "meta.json").get("embedding_fingerprint")
        content, fp = load_content(cfg, dataset, ids, fingerprint=_usable_fingerprint(cfg, dataset, fp))
    return Catalogue(ids, content, idx, _checkpoint_column(run_dir, ids, S.POPULARITY), fp)


def _usable_fingerprint(cfg: Settings, dataset: str, fp: str | None) -> str | None:
    """The checkpoint's own embedding version when the store still has it, else the current one."""
    if fp and store.has_version(cfg, dataset, fp):
        return fp
    if fp:
        log.warning("embedding version %s of the checkpoint is gone; using the current one", fp)
    return None
