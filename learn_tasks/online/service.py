"""The online recommendation service: Feast recent items -> content embeddings -> user tower -> Milvus.

``create_app(cfg)`` builds a FastAPI app around one :class:`Recommender`, which loads everything once at
start-up: the promoted model of the dataset (user and item towers), the frozen text encoder (for new
items), the content embeddings the model was trained on, the Feast store and the Milvus collection the
dataset's alias points at. The collection is pinned at start-up, so the user tower and the item vectors
always come from the same model version even if the alias moves meanwhile (``/health`` reports it).

Request path of ``GET /recommendations/{user_id}``:

1. the user's last L item ids from the Feast online store (feature service ``features.feature_service``);
2. their content embeddings (plus ID rows for hybrid models) -> user tower -> a 64-d user vector;
3. nearest items by inner product, the user's recent items excluded, cut to k: ids, titles, scores and
   cold-start / long-tail flags.

Search runs against Milvus itself (``serve.search=milvus``) or against an in-process replica of the pinned
collection (``serve.search=replica``, the default). Milvus Lite searches in pure Python over every row
(about 150 ms per query over 38k items on a laptop core), which alone exceeds a 50 ms p99 budget; the
replica is an exact search over the same rows, loaded from Milvus at start-up, updated in step with every
upsert this service makes and reloaded when another process changed the collection's row count
(checked every ``serve.replica_refresh_s``), so Milvus stays the system of record. With a Milvus
server, ``milvus`` is the natural choice.

Users the online store does not know, or whose history has no usable item, get an explicit fallback:
``content_based_seed`` when ``seed_item`` is given (nearest items to that item), else ``popular``; the
response says which strategy answered and why.

``POST /items`` (Bearer token) encodes a new item with the frozen LLM and the item tower, upserts it into
the pinned collection (and the replica) and checks that a search finds it before answering, so it is
recommendable when the response arrives; it is also appended to ``$LEARN_HOME/serve/<dataset>/new_items/``
so a restart or a new index version keeps it. ``POST /events`` (Bearer token) appends an event to the
user's online features. ``/health`` checks model, Feast and Milvus; ``/metrics`` is Prometheus text.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.storage import atomic_path, read_json

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("learn.serve")

INT64_MAX = 2**63 - 1
STRATEGY_PERSONALIZED = "personalized"
STRATEGY_POPULAR = "popular"
STRATEGY_SEED = "content_based_seed"
NEW_ITEM_FIELDS = (S.TITLE, S.CATEGORY, S.BRAND, S.DESCRIPTION, S.ATTRIBUTES)


class ServeError(RuntimeError):
    """A request that cannot be answered as asked; ``status`` is the HTTP status to return."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ==================================================================================================
# Ranking logic: plain functions, no HTTP, no stores
# ==================================================================================================
def usable_history(recent_ids: Sequence[int] | None, known: Callable[[int], bool], max_len: int) -> list[int]:
    """The items of a user's recent list the model can read (known content), the last ``max_len``, in order."""
    return [int(i) for i in (recent_ids or []) if known(int(i))][-max_len:]


def rank(candidates: Sequence[dict[str, Any]], exclude: set[int], k: int) -> list[dict[str, Any]]:
    """Best-first top-k of scored candidates: excluded and duplicate ids dropped, ties by item id."""
    seen: set[int] = set()
    out = []
    for c in sorted(candidates, key=lambda c: (-float(c["score"]), int(c[S.ITEM_ID]))):
        iid = int(c[S.ITEM_ID])
        if iid in exclude or iid in seen:
            continue
        seen.add(iid)
        out.append(c)
        if len(out) == k:
            break
    return out


def popular_fallback(popular: Sequence[dict[str, Any]], exclude: set[int], k: int) -> list[dict[str, Any]]:
    """The most popular items not excluded, in popularity order (``popular`` is already sorted)."""
    return [p for p in popular if int(p[S.ITEM_ID]) not in exclude][:k]


def item_payload(c: dict[str, Any]) -> dict[str, Any]:
    return {S.ITEM_ID: int(c[S.ITEM_ID]), S.TITLE: c.get(S.TITLE) or None, "score": float(c["score"]),
            S.IS_COLD_START: bool(c.get(S.IS_COLD_START)), S.IS_LONG_TAIL: bool(c.get(S.IS_LONG_TAIL))}


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
        from learn_tasks.pch import model as M

        run_dir = Path(run_dir)
        net, pcfg = M.load_checkpoint(run_dir)
        meta = read_json(run_dir / "meta.json") if (run_dir / "meta.json").exists() else {}
        vocab_df = pd.read_parquet(run_dir / "items.parquet")
        content_ids, content, fp = np.zeros(0, np.int64), None, meta.get("embedding_fingerprint")
        if pcfg.uses_content:
            from learn_tasks.ceg import encode

            if fp and not (encode.store_dir(cfg, dataset, fp) / "manifest.json").exists():
                log.warning("embedding version %s of %s is gone; using the current one", fp, run_dir.name)
                fp = None
            content_ids, content = encode.load_embeddings(cfg, dataset, fp)
            fp = fp or encode.current_fingerprint(cfg, dataset)
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

    def _content_rows(self, item_ids: Sequence[int]) -> np.ndarray:
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
                content = torch.from_numpy(self._content_rows(chunk)) if self.uses_content else None
                out.append(self.net.encode_items(content, torch.from_numpy(self._idx(chunk))).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net.config.vector_dim), np.float32)

    def new_item_vectors(self, content: np.ndarray) -> np.ndarray:
        """Item-tower embeddings of items the model never saw (ID row 0 = unknown)."""
        import torch

        with torch.inference_mode():
            c = torch.from_numpy(np.asarray(content, np.float32)) if self.uses_content else None
            idx = torch.zeros(len(content), dtype=torch.long)
            return self.net.encode_items(c, idx).float().numpy()

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
                content[b, :len(h)] = self._content_rows(h)
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
def new_items_dir(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.home / "serve" / dataset / "new_items"


def save_new_item(cfg: Settings, dataset: str, record: dict[str, Any], content: np.ndarray) -> Path:
    """Append one online item (its fields and content embedding) as a small Parquet part."""
    row = {k: record.get(k) for k in (S.ITEM_ID, *NEW_ITEM_FIELDS, S.PRICE)}
    row[S.EMBEDDING] = [np.asarray(content, np.float32).tolist()]
    row["created"] = datetime.now(timezone.utc).isoformat()
    frame = pd.DataFrame({k: [v] if k != S.EMBEDDING else v for k, v in row.items()})
    path = new_items_dir(cfg, dataset) / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
    with atomic_path(path, ".parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def load_new_items(cfg: Settings, dataset: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Items added online (last write per id wins) and their content embeddings, by item id."""
    parts = sorted(new_items_dir(cfg, dataset).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=[S.ITEM_ID, *NEW_ITEM_FIELDS]), np.zeros((0, 0), np.float32)
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.drop_duplicates(S.ITEM_ID, keep="last").sort_values(S.ITEM_ID).reset_index(drop=True)
    content = np.array([np.asarray(e, np.float32) for e in df.pop(S.EMBEDDING)], np.float32)
    return df, content


# ==================================================================================================
# Search over the pinned collection
# ==================================================================================================
class Replica:
    """An exact in-process copy of a Milvus collection's rows (ids, vectors, scalars) for fast search.

    Scores are one matrix-vector product in torch on the service's single torch thread: on a busy
    machine that is several times faster than numpy's multi-threaded BLAS for a 40k x 64 matrix.
    """

    def __init__(self, rows: Any):  # index.ItemRows
        self._lock = threading.Lock()
        self._set(rows.item_ids, rows.vectors, rows.popularity, rows.is_cold_start, rows.is_long_tail,
                  list(rows.titles))

    def _set(self, ids, vectors, popularity, cold, tail, titles) -> None:
        import torch

        self.ids, self.vectors = np.asarray(ids, np.int64), np.ascontiguousarray(vectors, np.float32)
        self._matrix = torch.from_numpy(self.vectors)  # shares memory with self.vectors
        self.popularity, self.cold, self.tail = np.asarray(popularity), np.asarray(cold, bool), np.asarray(tail, bool)
        self.titles = titles
        self.pos = {int(i): r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self.pos

    def vector(self, item_id: int) -> np.ndarray | None:
        r = self.pos.get(int(item_id))
        return None if r is None else self.vectors[r]

    def upsert(self, rows: Any) -> None:
        """Copy-on-write: searches running meanwhile keep reading the previous arrays."""
        with self._lock:
            ids, vecs = self.ids.copy(), self.vectors.copy()
            pop, cold, tail, titles = self.popularity.copy(), self.cold.copy(), self.tail.copy(), list(self.titles)
            extra = []
            for j, iid in enumerate(rows.item_ids):
                r = self.pos.get(int(iid))
                if r is None:
                    extra.append(j)
                    continue
                vecs[r], pop[r], cold[r], tail[r] = rows.vectors[j], rows.popularity[j], rows.is_cold_start[j], \
                    rows.is_long_tail[j]
                titles[r] = rows.titles[j]
            if extra:
                ids = np.r_[ids, rows.item_ids[extra]]
                vecs = np.vstack([vecs, rows.vectors[extra]])
                pop, cold = np.r_[pop, rows.popularity[extra]], np.r_[cold, rows.is_cold_start[extra]]
                tail = np.r_[tail, rows.is_long_tail[extra]]
                titles += [rows.titles[j] for j in extra]
            self._set(ids, vecs, pop, cold, tail, titles)

    def search(self, query: np.ndarray, k: int, exclude: set[int]) -> list[dict[str, Any]]:
        """Exact top-k by inner product, ``exclude`` left out; best first, ties by item id."""
        import torch

        ids, matrix, pos = self.ids, self._matrix, self.pos  # one consistent snapshot
        cold, tail, titles = self.cold, self.tail, self.titles
        scores = torch.mv(matrix, torch.from_numpy(np.ascontiguousarray(query, np.float32)))
        rows = [pos[i] for i in exclude if i in pos]
        if rows:
            scores[rows] = float("-inf")
        k_eff = min(k, len(ids))
        if k_eff <= 0:
            return []
        # One extra candidate settles a tie at the k-th place by item id.
        val, top = torch.topk(scores, min(k_eff + 1, len(ids)))
        hits = sorted(zip(val.tolist(), top.tolist()), key=lambda h: (-h[0], int(ids[h[1]])))[:k_eff]
        return [{S.ITEM_ID: int(ids[r]), "score": v, S.TITLE: titles[r],
                 S.IS_COLD_START: bool(cold[r]), S.IS_LONG_TAIL: bool(tail[r])}
                for v, r in hits if v != float("-inf")]


# ==================================================================================================
# The recommender: everything a request needs, loaded once
# ==================================================================================================
class Recommender:
    def __init__(self, cfg: Settings, dataset: str | None = None, run_dir: str | Path | None = None,
                 load_encoder: bool = True):
        import torch

        from learn_tasks.data import datasets as data
        from learn_tasks.online import features
        from learn_tasks.online import index
        from learn_tasks.pch import registry

        self.cfg = cfg
        self.dataset = dataset or cfg.serve.dataset or cfg.pipeline.dataset
        if cfg.serve.threads:
            torch.set_num_threads(cfg.serve.threads)
        t0 = time.perf_counter()
        run_dir = Path(run_dir) if run_dir is not None else registry.promoted(cfg, self.dataset)
        if run_dir is None:
            raise ServeError(f"no promoted model for dataset {self.dataset!r}: train one and promote it "
                             f"(`learn train --dataset {self.dataset} --promote`) before serving", 503)
        self.bundle = ModelBundle.load(cfg, self.dataset, run_dir)

        # Feast: the store and the feature service object, fetched once.
        fdir = features.store_dir(cfg, self.dataset)
        if not (fdir / "state.json").exists():
            raise ServeError(f"no feature store for {self.dataset!r} under {fdir}: run "
                             f"`learn features --dataset {self.dataset}`", 503)
        self.store = features.get_store(cfg, self.dataset)
        self.feature_service = self.store.get_feature_service(cfg.features.feature_service)
        self.recent = features.recent_len(cfg)
        self.feast_lock = threading.Lock()  # one SQLite connection inside Feast; serialise its use

        # Milvus: pin the collection the alias points at now; it must belong to this model version.
        self.client = index.connect(cfg)
        self.collection = index.current(cfg, self.dataset, self.client)
        expected = index.collection_name(self.dataset, self.bundle.version)
        if self.collection is None:
            raise ServeError(f"no item index for {self.dataset!r}: run `learn index --dataset {self.dataset}`", 503)
        if self.collection != expected:
            raise ServeError(f"the index alias {index.alias_name(cfg, self.dataset)} points at {self.collection}, "
                             f"but the promoted model is {self.bundle.version}: run `learn index --dataset "
                             f"{self.dataset}` to index it (or roll the model back)", 503)
        index.ensure_loaded(self.client, self.collection)
        self.replica: Replica | None = None
        rows = index.fetch_all(self.client, self.collection) if cfg.serve.search == "replica" else None
        if rows is not None:
            self.replica = Replica(rows)

        # Catalogue titles and the popular fallback (the model's training popularity).
        items = data.load_items(cfg, self.dataset)
        self.titles: dict[int, str] = dict(zip(items[S.ITEM_ID].astype(int),
                                               items[S.TITLE].fillna("").astype(str))) if S.TITLE in items else {}
        st = self.bundle.stats
        warm = st[st[S.POPULARITY] > 0].sort_values(S.POPULARITY, ascending=False, kind="stable")
        self.popular = [{S.ITEM_ID: int(i), "score": float(p), S.TITLE: self.titles.get(int(i)),
                         S.IS_COLD_START: False, S.IS_LONG_TAIL: bool(t)}
                        for i, p, t in zip(warm.index[: cfg.serve.max_k + 1000], warm[S.POPULARITY],
                                           warm[S.IS_LONG_TAIL])]
        self.catalogue_max_id = int(max(self.titles, default=0))
        if self.replica is not None and len(self.replica):
            self.catalogue_max_id = max(self.catalogue_max_id, int(self.replica.ids.max()))

        # Items added online earlier: readable by the user tower, and present in this collection.
        self.new_items = 0
        self._restore_new_items()

        self.encoder = None
        self.encoder_error: str | None = None
        if load_encoder and self.bundle.uses_content:
            from learn_tasks.ceg import encode

            try:
                self.encoder = encode.load_encoder(cfg)
            except Exception as exc:  # noqa: BLE001 - reads still work; POST /items reports it
                self.encoder_error = f"{type(exc).__name__}: {exc}"
                log.error("text encoder not loaded: %s", self.encoder_error)
        self.write_lock = threading.Lock()
        self.replica_reloads = 0
        self._stop = threading.Event()
        if self.replica is not None and cfg.serve.replica_refresh_s > 0:
            threading.Thread(target=self._watch_replica, name="replica-refresh", daemon=True).start()
        self.started_s = time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()

    def _watch_replica(self) -> None:
        while not self._stop.wait(self.cfg.serve.replica_refresh_s):
            try:
                self.refresh_replica()
            except Exception as exc:  # noqa: BLE001 - keep serving from the copy we have
                log.warning("replica refresh failed: %s", exc)

    def refresh_replica(self) -> bool:
        """Reload the replica when the collection's row count differs from it (True when reloaded).

        Catches items that other processes (the item-ingest task) upserted into the pinned collection.
        """
        from learn_tasks.online import index

        if self.replica is None:
            return False
        rows = int(self.client.get_collection_stats(self.collection).get("row_count", -1))
        if rows == len(self.replica):
            return False
        fresh = index.fetch_all(self.client, self.collection)
        with self.write_lock:  # not in the middle of this service's own upsert
            self.replica = Replica(fresh)
        self.replica_reloads += 1
        return True

    # -------------------------------------------------------------------------------------- helpers
    def _restore_new_items(self) -> None:
        from learn_tasks.online import index

        df, content = load_new_items(self.cfg, self.dataset)
        if not len(df):
            return
        ids = df[S.ITEM_ID].to_numpy(np.int64)
        for i, c in zip(ids, content):
            if self.bundle.uses_content:
                self.bundle.extra[int(i)] = c
            self.titles[int(i)] = str(df.loc[df[S.ITEM_ID] == i, S.TITLE].iloc[0] or "")
        missing = [j for j, i in enumerate(ids) if not self._in_index(int(i))]
        if missing:  # indexed under an older model version: re-encode with this one's item tower
            rows = self._new_rows(ids[missing], content[missing], [self.titles.get(int(ids[j]), "") for j in missing])
            index.upsert(self.cfg, self.dataset, rows, target=self.collection, client=self.client)
            if self.replica is not None:
                self.replica.upsert(rows)
        self.new_items = len(ids)
        self.catalogue_max_id = max(self.catalogue_max_id, int(ids.max()))

    def _in_index(self, item_id: int) -> bool:
        if self.replica is not None:
            return item_id in self.replica
        return bool(self.client.query(self.collection, ids=[int(item_id)], output_fields=[S.ITEM_ID]))

    def _new_rows(self, ids: np.ndarray, content: np.ndarray, titles: list[str]):
        from learn_tasks.online import index

        now = int(time.time())
        return index.ItemRows(item_ids=ids, vectors=self.bundle.new_item_vectors(content),
                              popularity=np.zeros(len(ids), np.int64), first_seen=np.full(len(ids), now, np.int64),
                              is_cold_start=np.ones(len(ids), bool), is_long_tail=np.zeros(len(ids), bool),
                              titles=titles)

    def _search(self, query: np.ndarray, k: int, exclude: set[int]) -> list[dict[str, Any]]:
        if self.replica is not None:
            return self.replica.search(query, k, exclude)
        from learn_tasks.online import index

        hits = index.search(self.client, self.collection, query[None, :], k, exclude=[sorted(exclude)],
                            search_params=self.cfg.index.search_params)[0]
        return hits

    def _item_vector(self, item_id: int) -> np.ndarray | None:
        if self.replica is not None:
            return self.replica.vector(item_id)
        from learn_tasks.online import index

        got = self.client.query(self.collection, ids=[int(item_id)], output_fields=[index.VECTOR])
        return np.asarray(got[0][index.VECTOR], np.float32) if got else None

    def online_features(self, user_id: int) -> dict[str, Any]:
        from learn_tasks.online import features

        with self.feast_lock:
            return features.online_user_features(self.store, [user_id], feature_service=self.feature_service)[
                int(user_id)]

    # -------------------------------------------------------------------------------------- requests
    def recommend(self, user_id: int, k: int, seed_item: int | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        feats = self.online_features(user_id)
        recent = feats.get(S.RECENT_ITEM_IDS) or []
        history = usable_history(recent, self.bundle.knows, self.bundle.max_len)
        exclude = {int(i) for i in recent}
        t_feast = time.perf_counter()
        reason = None
        if history:
            user = self.bundle.user_vectors([history])[0]
            t_model = time.perf_counter()
            hits = self._search(user, k + len(exclude), exclude)
            items, strategy = rank(hits, exclude, k), STRATEGY_PERSONALIZED
        else:
            t_model = time.perf_counter()
            reason = "unknown user" if feats.get(S.RECENT_ITEM_IDS) is None else "no usable history"
            if seed_item is not None:
                vec = self._item_vector(seed_item)
                if vec is None:
                    raise ServeError(f"seed_item {seed_item} is not in the index", 404)
                exclude |= {int(seed_item)}
                items = rank(self._search(vec, k + len(exclude), exclude), exclude, k)
                strategy = STRATEGY_SEED
            else:
                items, strategy = popular_fallback(self.popular, exclude, k), STRATEGY_POPULAR
        t_end = time.perf_counter()
        return {
            S.USER_ID: int(user_id), "k": int(k), "strategy": strategy, "fallback": strategy != STRATEGY_PERSONALIZED,
            "reason": reason, "history_length": len(history), "model_version": self.bundle.version,
            "index_collection": self.collection, "items": [item_payload(c) for c in items],
            "timing_ms": {"features": 1000 * (t_feast - t0), "user_tower": 1000 * (t_model - t_feast),
                          "search": 1000 * (t_end - t_model), "total": 1000 * (t_end - t0)},
        }

    def add_item(self, record: dict[str, Any]) -> dict[str, Any]:
        """Encode, index and verify a new item; returns once a search finds it."""
        from learn_tasks.ceg import encode
        from learn_tasks.online import index

        t0 = time.perf_counter()
        if self.bundle.uses_content and self.encoder is None:
            raise ServeError(f"the text encoder is not available: {self.encoder_error}", 503)
        with self.write_lock:
            item_id = record.get(S.ITEM_ID)
            if item_id is None:
                item_id = self.catalogue_max_id + 1
            item_id = int(item_id)
            if item_id in self.titles or self._in_index(item_id):
                raise ServeError(f"item_id {item_id} already exists", 409)
            record = {**record, S.ITEM_ID: item_id}
            frame = pd.DataFrame([{S.ITEM_ID: item_id, **{f: record.get(f) for f in NEW_ITEM_FIELDS},
                                   S.PRICE: record.get(S.PRICE)}])
            if self.bundle.uses_content:
                try:
                    content = encode.encode_items(frame, self.cfg, self.encoder)
                except ValueError as exc:
                    raise ServeError(f"item has no text to encode: {exc}", 422) from exc
            else:
                content = np.zeros((1, 0), np.float32)
            t_enc = time.perf_counter()
            rows = self._new_rows(np.array([item_id]), content, [str(record.get(S.TITLE) or "")])
            index.upsert(self.cfg, self.dataset, rows, target=self.collection, client=self.client)
            if self.replica is not None:
                self.replica.upsert(rows)
            if self.bundle.uses_content:
                self.bundle.extra[item_id] = content[0]
            save_new_item(self.cfg, self.dataset, record, content[0])
            self.titles[item_id] = str(record.get(S.TITLE) or "")
            self.catalogue_max_id = max(self.catalogue_max_id, item_id)
            self.new_items += 1
        # Recommendable = the serving search returns it for its own vector.
        found = any(h[S.ITEM_ID] == item_id for h in self._search(rows.vectors[0], 10, set()))
        t_end = time.perf_counter()
        if not found:
            raise ServeError(f"item {item_id} was upserted but a search does not return it yet", 503)
        return {S.ITEM_ID: item_id, "collection": self.collection, "recommendable": True,
                "encode_s": t_enc - t0, "time_to_recommendable_s": t_end - t0, S.IS_COLD_START: True}

    def record_event(self, user_id: int, item_id: int, when: datetime | None) -> dict[str, Any]:
        from learn_tasks.online import features

        if not (item_id in self.titles or self.bundle.knows(item_id) or self._in_index(item_id)):
            raise ServeError(f"item_id {item_id} is not in the catalogue", 404)
        when = when or datetime.now(timezone.utc)
        with self.feast_lock:
            current = features.online_user_features(self.store, [user_id], feature_service=self.feature_service)[
                int(user_id)]
            new = features.push_event(self.store, user_id, item_id, when, self.recent, current=current)
        return {S.USER_ID: int(user_id), S.ITEM_ID: int(item_id), "recorded": True,
                "history_length": len(new[S.RECENT_ITEM_IDS]), S.EVENT_COUNT: new[S.EVENT_COUNT]}

    def health(self) -> dict[str, Any]:
        from learn_tasks.online import index

        checks: dict[str, Any] = {}
        try:
            self.online_features(-1)
            checks["feast"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["feast"] = f"error: {exc}"
        try:
            live = index.current(self.cfg, self.dataset, self.client)
            n = self.client.get_collection_stats(self.collection).get("row_count")
            checks["milvus"] = "ok"
            checks["index"] = {"collection": self.collection, "rows": n, "alias_now": live,
                               "alias_moved": live != self.collection,
                               "replica_rows": len(self.replica) if self.replica is not None else None}
        except Exception as exc:  # noqa: BLE001
            checks["milvus"] = f"error: {exc}"
        checks["model"] = {"version": self.bundle.version, "kind": self.bundle.kind, "status": "ok"}
        checks["encoder"] = "ok" if self.encoder is not None else (self.encoder_error or "not needed")
        ok = checks["feast"] == "ok" and checks["milvus"] == "ok"
        return {"status": "ok" if ok else "degraded", "dataset": self.dataset, "search": self.cfg.serve.search,
                "new_items": self.new_items, "replica_reloads": self.replica_reloads, "startup_s": self.started_s,
                "checks": checks}


# ==================================================================================================
# HTTP
# ==================================================================================================
class RecommendedItem(BaseModel):
    item_id: int
    title: str | None
    score: float = Field(description="inner product of user and item embeddings (popularity for `popular`)")
    is_cold_start: bool = Field(description="the model saw no interaction of this item in training")
    is_long_tail: bool


class Recommendations(BaseModel):
    """Response of GET /recommendations/{user_id} (documentation; the service builds it directly)."""

    user_id: int
    k: int
    strategy: str = Field(description="personalized | popular | content_based_seed")
    fallback: bool
    reason: str | None = Field(description="why a fallback answered: unknown user | no usable history")
    history_length: int
    model_version: str
    index_collection: str
    items: list[RecommendedItem]
    timing_ms: dict[str, float]


class NewItem(BaseModel):
    """Body of POST /items: the item's text fields (what the encode template reads)."""

    model_config = ConfigDict(extra="forbid")
    item_id: int | None = Field(None, ge=0, le=INT64_MAX, description="omit to get the next free id")
    title: str | None = Field(None, max_length=2000)
    category: str | None = Field(None, max_length=2000)
    brand: str | None = Field(None, max_length=500)
    description: str | None = Field(None, max_length=20000)
    attributes: str | None = Field(None, max_length=20000)
    price: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _has_text(self) -> "NewItem":
        if not any((getattr(self, f) or "").strip() for f in NEW_ITEM_FIELDS):
            raise ValueError(f"an item needs text in at least one of {', '.join(NEW_ITEM_FIELDS)}")
        return self


class Event(BaseModel):
    """Body of POST /events: one user event."""

    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(..., ge=0, le=INT64_MAX)
    item_id: int = Field(..., ge=0, le=INT64_MAX)
    event_timestamp: datetime | None = Field(None, description="ISO 8601; default: now (UTC)")


def create_app(cfg: Settings, dataset: str | None = None, recommender: Recommender | None = None) -> "FastAPI":
    """The FastAPI app; the model, features and index are loaded here, once."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Path as PathParam, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from learn_tasks.online import explorer

    rec = recommender or Recommender(cfg, dataset)
    token = os.environ.get(cfg.serve.token_env) or None
    metrics = CollectorRegistry()  # per app: several apps (tests) never share counters
    m_requests = Counter("learn_http_requests_total", "HTTP requests", ["endpoint", "status"], registry=metrics)
    m_latency = Histogram("learn_http_request_seconds", "Request latency", ["endpoint"], registry=metrics,
                          buckets=(.002, .005, .01, .02, .03, .05, .075, .1, .2, .5, 1, 2, 5))
    m_strategy = Counter("learn_recommendations_total", "Recommendation responses by strategy", ["strategy"],
                         registry=metrics)
    m_new_item = Histogram("learn_new_item_seconds", "New item: request to recommendable", registry=metrics,
                           buckets=(.01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
    m_items = Gauge("learn_index_items", "Rows of the serving index", registry=metrics)
    m_items.set_function(lambda: len(rec.replica) if rec.replica is not None else float("nan"))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        rec.close()

    app = FastAPI(title="learn recommendations",
                  description="LEARN recommendations: Feast features -> frozen-LLM content -> user tower -> Milvus.",
                  version="1", lifespan=lifespan)
    app.state.recommender = rec
    app.include_router(explorer.router)  # the /explorer page (learn_tasks/online/explorer.py)

    def require_token(authorization: str | None = Header(None)) -> None:
        if token is None:
            raise HTTPException(503, f"writes are disabled: set {cfg.serve.token_env} for the service")
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    class Observe:
        """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): count and time requests by route template."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0, status = time.perf_counter(), [500]

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_wrapper)
            finally:
                endpoint = getattr(scope.get("route"), "path", "unmatched")  # set by the router
                m_requests.labels(endpoint, str(status[0])).inc()
                m_latency.labels(endpoint).observe(time.perf_counter() - t0)

    app.add_middleware(Observe)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    # async on purpose: the work is a few milliseconds of CPU under the GIL, so running it on the event
    # loop saves the thread-pool hop per request; the slow writes (encoding) stay in the thread pool.
    @app.get("/recommendations/{user_id}", summary="Top-k items for a user (with a labelled fallback)",
             responses={200: {"model": Recommendations}})
    async def recommendations(user_id: int = PathParam(..., ge=0, le=INT64_MAX),
                        k: int = Query(cfg.serve.default_k, ge=1, le=cfg.serve.max_k),
                        seed_item: int | None = Query(None, ge=0, le=INT64_MAX,
                                                      description="fallback seed for users without history")):
        out = rec.recommend(user_id, k, seed_item)
        m_strategy.labels(out["strategy"]).inc()
        return JSONResponse(out)  # plain dicts of JSON types: skip FastAPI's generic re-encoding

    @app.post("/items", status_code=201, dependencies=[Depends(require_token)],
              summary="Register a new item: encoded, indexed and recommendable when this returns")
    def add_item(item: NewItem):
        out = rec.add_item(item.model_dump())
        m_new_item.observe(out["time_to_recommendable_s"])
        return out

    @app.post("/events", status_code=202, dependencies=[Depends(require_token)],
              summary="Record a user event in the online features")
    def add_event(event: Event):
        return rec.record_event(event.user_id, event.item_id, event.event_timestamp)

    @app.get("/health", summary="Model, Feast and Milvus checks")
    def health():
        out = rec.health()
        return JSONResponse(out, status_code=200 if out["status"] == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def run(cfg: Settings, dataset: str | None = None, host: str | None = None, port: int | None = None) -> None:
    """Serve the promoted model of ``dataset`` with uvicorn (blocks until stopped)."""
    import uvicorn

    app = create_app(cfg, dataset)
    uvicorn.run(app, host=host or cfg.serve.host, port=int(port or cfg.serve.port), log_level="warning",
                access_log=False)
