"""The model at serving time, and the items added online.

A :class:`ModelBundle` is one model version with everything its towers read: the content embeddings it
was trained on (plus those of items added online), the ID vocabulary of its run and the run's item
statistics. The index (``index.index_catalogue``) and the service (``recommender.Recommender``) both load
one.

Items added online (``POST /items``) are saved in the event log's ``items`` stream before anything else
(:mod:`learn_tasks.data.eventlog`); once encoded, their content embedding is appended to
``$LEARN_HOME/serve/<dataset>/new_items/`` as a small Parquet part (``cfg.paths.new_items``), so a restart
or a new index version reuses it. An item saved but not encoded yet (the process died in between) is
*pending*: :func:`encode_pending_items` encodes it (the service at start-up, ``learn index``), and the
pipeline lands it into the catalogue like any new item.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.ceg import encode, encoder, store
from learn_tasks.config import Settings
from learn_tasks.data import eventlog
from learn_tasks.pch import model as M
from learn_tasks.storage import atomic_path, read_json

log = logging.getLogger("learn.serve")

NEW_ITEM_FIELDS = (S.TITLE, S.CATEGORY, S.BRAND, S.DESCRIPTION, S.ATTRIBUTES)


def usable_history(recent_ids: Sequence[int] | None, known: Callable[[int], bool], max_len: int) -> list[int]:
    """The items of a user's recent list the model can read (known content), the last ``max_len``, in order."""
    return [int(i) for i in (recent_ids or []) if known(int(i))][-max_len:]


# ==================================================================================================
# The model at serving time
# ==================================================================================================
@dataclass
class ModelBundle:
    """A model version with what its towers read: content embeddings and the ID vocab of its training run."""

    version: str
    run_dir: Path
    kind: str
    net: Any  # model.PCH
    max_len: int
    content_ids: np.ndarray  # [N] int64 ascending
    content: np.ndarray | None  # [N, d_in] float32 (None for sasrec)
    vocab: dict[int, int]  # item_id -> item_idx (0 = unknown)
    stats: pd.DataFrame  # items.parquet of the run, indexed by item_id (popularity, slice flags)
    fingerprint: str | None
    extra: dict[int, np.ndarray] = field(default_factory=dict)  # content of items added online
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, cfg: Settings, dataset: str, run_dir: str | Path) -> "ModelBundle":
        run_dir = Path(run_dir)
        net, pcfg = M.load_checkpoint(run_dir)
        meta = read_json(run_dir / "meta.json") if (run_dir / "meta.json").exists() else {}
        vocab_df = pd.read_parquet(run_dir / "items.parquet")
        content_ids, content, fp = np.zeros(0, np.int64), None, meta.get("embedding_fingerprint")
        if pcfg.uses_content:
            if fp and not store.has_version(cfg, dataset, fp):
                log.warning("embedding version %s of %s is gone; using the current one", fp, run_dir.name)
                fp = None
            content_ids, content = store.load_embeddings(cfg, dataset, fp)
            fp = fp or store.current_fingerprint(cfg, dataset)
        return cls(version=run_dir.name, run_dir=run_dir, kind=pcfg.kind, net=net, max_len=pcfg.max_len,
                   content_ids=content_ids, content=content,
                   vocab=dict(zip(vocab_df[S.ITEM_ID].astype(int), vocab_df["item_idx"].astype(int))),
                   stats=vocab_df.set_index(S.ITEM_ID), fingerprint=fp)

    @property
    def uses_content(self) -> bool:
        return self.content is not None

    def knows(self, item_id: int) -> bool:
        """Can the user tower read this item? (content models: has content; sasrec: in the ID vocab)."""
        if not self.uses_content:
            return self.vocab.get(int(item_id), 0) > 0
        if int(item_id) in self.extra:
            return True
        pos = np.searchsorted(self.content_ids, item_id)
        return pos < len(self.content_ids) and self.content_ids[pos] == item_id

    def content_rows(self, item_ids: Sequence[int]) -> np.ndarray:
        """Content embeddings [N, d] of catalogue items and items added online (KeyError for others)."""
        ids = np.asarray(item_ids, np.int64)
        out = np.empty((len(ids), self.content.shape[1]), np.float32)
        pos = np.clip(np.searchsorted(self.content_ids, ids), 0, max(len(self.content_ids) - 1, 0))
        for r, (i, p) in enumerate(zip(ids, pos)):
            if len(self.content_ids) and self.content_ids[p] == i:
                out[r] = self.content[p]
            elif int(i) in self.extra:
                out[r] = self.extra[int(i)]
            else:
                raise KeyError(f"item {int(i)} has no content embedding")
        return out

    def _idx(self, item_ids: Sequence[int]) -> np.ndarray:
        return np.array([self.vocab.get(int(i), 0) for i in item_ids], np.int64)

    def item_vectors(self, item_ids: Sequence[int], batch: int = 4096) -> np.ndarray:
        """Item-tower embeddings [N, out] of catalogue items (unknown ids use the unknown-item row)."""
        import torch

        item_ids = np.asarray(item_ids, np.int64)
        out = []
        with torch.inference_mode():
            for lo in range(0, len(item_ids), batch):
                chunk = item_ids[lo:lo + batch]
                content = torch.from_numpy(self.content_rows(chunk)) if self.uses_content else None
                out.append(self.net.encode_items(content, torch.from_numpy(self._idx(chunk))).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net.config.vector_dim), np.float32)

    def new_item_vectors(self, content: np.ndarray) -> np.ndarray:
        """Item-tower embeddings of items the model never saw (ID row 0 = unknown)."""
        import torch

        with torch.inference_mode():
            c = torch.from_numpy(np.asarray(content, np.float32)) if self.uses_content else None
            idx = torch.zeros(len(content), dtype=torch.long)
            return self.net.encode_items(c, idx).float().numpy()

    def seed_query(self, vector: np.ndarray) -> np.ndarray:
        """The query of a seeded search from a stored item vector (the vector itself unless evidence
        weighting stores ``[w v, (1 - w) v']``; see :func:`learn_tasks.pch.model.seed_query`)."""
        c = self.net.config
        if c.mix_k > 0 and np.shape(vector)[-1] == 2 * c.out_dim:
            return M.seed_query(vector, c.out_dim)
        return np.asarray(vector, np.float32)

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """User-tower embeddings [B, out] of item-id histories (oldest first, every id known, non-empty)."""
        import torch

        B = len(histories)
        L = max(1, min(self.max_len, max((len(h) for h in histories), default=1)))
        mask = np.zeros((B, L), bool)
        idx = np.zeros((B, L), np.int64)
        content = np.zeros((B, L, self.content.shape[1]), np.float32) if self.uses_content else None
        for b, h in enumerate(histories):
            h = list(h)[-L:]
            mask[b, :len(h)] = True  # left-aligned: events first, padding after
            idx[b, :len(h)] = self._idx(h)
            if content is not None and h:
                content[b, :len(h)] = self.content_rows(h)
        with torch.inference_mode():
            u = self.net.encode_users(torch.from_numpy(content) if content is not None else None,
                                      torch.from_numpy(mask), torch.from_numpy(idx))
        return u.float().numpy()

    def sample_user_vectors(self, interactions: pd.DataFrame, n: int, seed: int = 0) -> np.ndarray:
        """User embeddings of up to ``n`` random users (their last max_len known items): realistic queries."""
        users = interactions[S.USER_ID].unique()
        rng = np.random.default_rng(seed)
        pick = set(rng.choice(users, size=min(n, len(users)), replace=False).tolist()) if len(users) else set()
        sub = interactions[interactions[S.USER_ID].isin(pick)].sort_values([S.USER_ID, S.EVENT_TIMESTAMP],
                                                                           kind="stable")
        hist = [usable_history(g.tolist(), self.knows, self.max_len) for _, g in sub.groupby(S.USER_ID)[S.ITEM_ID]]
        hist = [h for h in hist if h]
        return self.user_vectors(hist) if hist else np.zeros((0, self.net.config.vector_dim), np.float32)


# ==================================================================================================
# Items added online
# ==================================================================================================
def save_new_item(cfg: Settings, dataset: str, record: dict[str, Any], content: np.ndarray) -> Path:
    """Append one online item (its fields and content embedding) as a small Parquet part."""
    row = {k: record.get(k) for k in (S.ITEM_ID, *NEW_ITEM_FIELDS, S.PRICE)}
    row[S.EMBEDDING] = [np.asarray(content, np.float32).tolist()]
    row["created"] = datetime.now(timezone.utc).isoformat()
    frame = pd.DataFrame({k: [v] if k != S.EMBEDDING else v for k, v in row.items()})
    path = cfg.paths.new_items(dataset) / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
    with atomic_path(path, ".parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def load_new_items(cfg: Settings, dataset: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Items added online (last write per id wins) and their content embeddings, by item id."""
    parts = sorted(cfg.paths.new_items(dataset).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=[S.ITEM_ID, *NEW_ITEM_FIELDS]), np.zeros((0, 0), np.float32)
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.drop_duplicates(S.ITEM_ID, keep="last").sort_values(S.ITEM_ID).reset_index(drop=True)
    content = np.array([np.asarray(e, np.float32) for e in df.pop(S.EMBEDDING)], np.float32)
    return df, content


def pending_items(cfg: Settings, dataset: str, event_log: eventlog.EventLog) -> pd.DataFrame:
    """Items saved in the log whose content embedding is not stored yet (canonical item columns)."""
    saved = event_log.items(dataset)
    if not len(saved):
        return saved
    done = {int(i) for i in load_new_items(cfg, dataset)[0][S.ITEM_ID]}
    return saved[~saved[S.ITEM_ID].isin(done)].reset_index(drop=True)


def encode_pending_items(cfg: Settings, dataset: str, event_log: eventlog.EventLog, text_encoder: Any = None,
                         skip: Callable[[int], bool] | None = None, with_content: bool = True) -> list[int]:
    """Encode the pending items (not ``skip``-ped) and store their parts; returns their ids.

    An item without any text cannot be encoded: it stays pending here, and validation quarantines it
    when the pipeline lands it. ``with_content=False`` (a model that reads no content) stores the parts
    without encoding.
    """
    todo = pending_items(cfg, dataset, event_log)
    if skip is not None and len(todo):
        todo = todo[[not skip(int(i)) for i in todo[S.ITEM_ID]]]
    done = []
    if not len(todo):
        return done
    if with_content:
        text_encoder = text_encoder or encoder.load_encoder(cfg)
    for _, row in todo.iterrows():
        record = {k: (None if pd.isna(v) else v) for k, v in row.items() if k in (S.ITEM_ID, *NEW_ITEM_FIELDS, S.PRICE)}
        if not with_content:
            save_new_item(cfg, dataset, record, np.zeros(0, np.float32))
            done.append(int(record[S.ITEM_ID]))
            continue
        try:
            content = encode.encode_items(pd.DataFrame([record]), cfg, text_encoder)
        except ValueError as exc:
            log.warning("pending item %s cannot be encoded: %s", record[S.ITEM_ID], exc)
            continue
        save_new_item(cfg, dataset, record, content[0])
        done.append(int(record[S.ITEM_ID]))
    return done
