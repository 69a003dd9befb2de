"""The recommender: everything a request needs, loaded once, and the ranking logic it answers with.

A :class:`Recommender` is one release (:mod:`learn_tasks.online.releases`): it loads the release's model
run (user and item towers), the frozen text encoder (for new items), the content embeddings the model was
trained on, the Feast store and the release's Milvus collection, so the user tower and the item vectors
always come from the same model version. The service (``follow.ReleaseFollower``) builds a new one for
each new release and swaps it in; without a release record (a home indexed by hand before releases
existed) it falls back to the promoted model and the collection the alias points at, which must match.

Request path of :meth:`Recommender.recommend`:

1. the user's last L item ids from the Feast online store (feature service ``features.feature_service``);
2. their content embeddings (plus ID rows for hybrid models) -> user tower -> a 64-d user vector;
3. nearest items by inner product, the user's recent items excluded, cut to k: ids, titles, scores and
   cold-start / long-tail flags.

Search runs against Milvus itself (``serve.search=milvus``) or against an in-process
:class:`~learn_tasks.online.replica.Replica` of the release's collection (``serve.search=replica``, the
default), reloaded when another process changed the collection's row count (checked every
``serve.replica_refresh_s``).

Users the online store does not know, or whose history has no usable item, get an explicit fallback:
``content_based_seed`` when ``seed_item`` is given (nearest items to that item), else ``popular``; the
response says which strategy answered and why.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import threadpoolctl

from learn_tasks import schema as S
from learn_tasks.ceg import encode, encoder
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.data import eventlog
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.online import events, features, index, releases, updates
from learn_tasks.online.bundle import (NEW_ITEM_FIELDS, ModelBundle, encode_pending_items, load_new_items,
                                       save_new_item, usable_history)
from learn_tasks.online.replica import Replica
from learn_tasks.pch import registry

log = logging.getLogger("learn.serve")

STRATEGY_PERSONALIZED = "personalized"
STRATEGY_POPULAR = "popular"
STRATEGY_SEED = "content_based_seed"


class ServeError(RuntimeError):
    """A request that cannot be answered as asked; ``status`` is the HTTP status to return."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Retired(ServeError):
    """This recommender was swapped out for a newer release; the write goes to the current one instead."""

    def __init__(self, version: str):
        super().__init__(f"model {version} was replaced by a newer release", 503)


# ==================================================================================================
# Ranking logic: plain functions, no HTTP, no stores
# ==================================================================================================
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
# The recommender: everything a request needs, loaded once
# ==================================================================================================
class Recommender:
    """The model, Feast store, collection (and replica) and text encoder of one release, with the
    request handlers the HTTP layer (``service.create_app``) calls."""

    def __init__(self, cfg: Settings, dataset: str | None = None, run_dir: str | Path | None = None,
                 load_encoder: bool = True, collection: str | None = None, release: dict[str, Any] | None = None,
                 encoder_model: Any = None, feast_lock: Any = None):
        """``release`` (a release record) names the model run and collection; ``run_dir`` + ``collection``
        name them directly; with neither, the dataset's current release is served (else the promoted model
        behind the alias). ``encoder_model`` and ``feast_lock`` are shared with the previous release's."""
        import torch

        self.cfg = cfg
        self.dataset = dataset or cfg.serve.dataset or cfg.pipeline.dataset
        if cfg.serve.threads:
            torch.set_num_threads(cfg.serve.threads)
            # The replica's search is a numpy (BLAS) product: the same bound keeps its threads from
            # contending with the other requests' work.
            threadpoolctl.threadpool_limits(cfg.serve.threads, user_api="blas")
        t0 = time.perf_counter()
        if run_dir is None and release is None:
            release = releases.current(cfg, self.dataset)
        if release is not None:
            run_dir, collection = releases.model_dir(cfg, self.dataset, release), release["collection"]
        self.release = release
        run_dir = Path(run_dir) if run_dir is not None else registry.promoted(cfg, self.dataset)
        if run_dir is None:
            raise ServeError(f"no release and no promoted model for dataset {self.dataset!r}: train one and promote "
                             f"it (`learn train --dataset {self.dataset} --promote`), then `learn index --dataset "
                             f"{self.dataset}` to release it", 503)
        self.bundle = ModelBundle.load(cfg, self.dataset, run_dir)

        # Feast: the store and the feature service object, fetched once.
        fdir = features.store_dir(cfg, self.dataset)
        if not (fdir / "state.json").exists():
            raise ServeError(f"no feature store for {self.dataset!r} under {fdir}: run "
                             f"`learn features --dataset {self.dataset}`", 503)
        self.store = features.get_store(cfg, self.dataset)
        self.feature_service = self.store.get_feature_service(cfg.features.feature_service)
        self.recent = features.recent_len(cfg)
        self.feast_lock = feast_lock or threading.Lock()  # one SQLite connection inside Feast; serialise its use
        # The event log (events, items added online, served recommendations) and the lock that keeps
        # its writers and the online rows in step (learn_tasks/online/updates.py).
        self.log = open_log(cfg)
        self.online_lock = updates.OnlineLock(cfg, self.dataset)

        # Milvus: the release's collection, or the one the alias points at now (it must be this model's).
        self.client = index.connect(cfg)
        self.collection = collection or index.current(cfg, self.dataset, self.client)
        if self.collection is None:
            raise ServeError(f"no item index for {self.dataset!r}: run `learn index --dataset {self.dataset}`", 503)
        if collection is None and index.collection_version(self.client, self.collection) != self.bundle.version:
            raise ServeError(f"the index alias {index.alias_name(cfg, self.dataset)} points at {self.collection}, "
                             f"but the promoted model is {self.bundle.version}: run `learn index --dataset "
                             f"{self.dataset}` to index it (or roll the model back)", 503)
        index.ensure_loaded(self.client, self.collection)
        items = data.load_items(cfg, self.dataset)
        self.replica: Replica | None = None
        rows = (index.fetch_all(self.client, self.collection, expected_ids=items[S.ITEM_ID].to_numpy(np.int64))
                if cfg.serve.search == "replica" else None)
        if rows is not None:
            self.replica = Replica(rows)

        # Catalogue titles and the popular fallback (the model's training popularity).
        self.titles: dict[int, str] = dict(zip(items[S.ITEM_ID].astype(int),
                                               items[S.TITLE].fillna("").astype(str))) if S.TITLE in items else {}
        st = self.bundle.stats
        warm = st[st[S.POPULARITY] > 0].sort_values(S.POPULARITY, ascending=False, kind="stable")
        self.popular = [{S.ITEM_ID: int(i), "score": float(p), S.TITLE: self.titles.get(int(i)),
                         S.IS_COLD_START: False, S.IS_LONG_TAIL: bool(t)}
                        for i, p, t in zip(warm.index[: cfg.serve.max_k + 1000], warm[S.POPULARITY],
                                           warm[S.IS_LONG_TAIL])]
        self.sources: dict[str, int] = {}
        if S.SOURCE_ID in items:
            known_source = items[S.SOURCE_ID].notna()
            self.sources = dict(zip(items.loc[known_source, S.SOURCE_ID].astype(str),
                                    items.loc[known_source, S.ITEM_ID].astype(int)))
        self.pending: set[int] = set()  # items saved in the log (by any replica) and not in the catalogue
        self.catalogue_max_id = int(max(self.titles, default=0))
        if self.replica is not None and len(self.replica):
            self.catalogue_max_id = max(self.catalogue_max_id, int(self.replica.ids.max()))

        # Items added online earlier: readable by the user tower, and present in this collection.
        self.new_items = 0
        self._restore_new_items()

        self.encoder = encoder_model
        self.encoder_error: str | None = None
        if load_encoder and self.bundle.uses_content and self.encoder is None:
            try:
                self.encoder = encoder.load_encoder(cfg)
            except Exception as exc:  # noqa: BLE001 - reads still work; POST /items reports it
                self.encoder_error = f"{type(exc).__name__}: {exc}"
                log.error("text encoder not loaded: %s", self.encoder_error)
        self._recover_pending_items()
        # Events logged since the feature tables were built: put them back into the online rows
        # (a rebuild, or a crash between a log append and its online write, may have left them out).
        try:
            self.replayed: dict[str, Any] = updates.replay_tail(cfg, self.dataset, self.store, self.online_lock,
                                                                self.log)
        except Exception as exc:  # noqa: BLE001 - serve anyway; /health says what failed
            self.replayed = {"error": f"{type(exc).__name__}: {exc}"}
            log.error("online feature replay failed: %s", self.replayed["error"])
        self.write_lock = threading.Lock()
        self.retired = False  # set under write_lock when a newer release takes over
        self.replica_reloads = 0
        self._stop = threading.Event()
        if self.replica is not None and cfg.serve.replica_refresh_s > 0:
            threading.Thread(target=self._watch_replica, name="replica-refresh", daemon=True).start()
        if self.replica is not None and cfg.serve.items_poll_s > 0:
            threading.Thread(target=self._watch_new_items, name="new-items", daemon=True).start()
        self.started_s = time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self.log.close()

    def retire(self) -> None:
        """A newer release takes over: writes that reach this one from now on are sent to it instead."""
        with self.write_lock:
            self.retired = True

    def catch_up(self) -> None:
        """Index the items another recommender added online while this one loaded (they are on disk)."""
        with self.write_lock:
            self._restore_new_items()

    def _watch_replica(self) -> None:
        while not self._stop.wait(self.cfg.serve.replica_refresh_s):
            try:
                self.refresh_replica()
            except Exception as exc:  # noqa: BLE001 - keep serving from the copy we have
                if self._stop.is_set():
                    return  # closed while refreshing: its clients are gone, which is no failure
                log.warning("replica refresh failed: %s", exc)

    def _watch_new_items(self) -> None:
        """Items another process of the service added online (``serve.workers`` > 1, or replicas): the log's
        item stream grows, and they are read from the new-item store into this replica within
        ``serve.items_poll_s``. A high-water mark counts as seen once every logged item is indexed here
        (the writer logs an item before it stores its content). Each poll is one read of the log."""
        seen = -1
        while not self._stop.wait(self.cfg.serve.items_poll_s):
            try:
                logged = self.log.items(self.dataset)[S.ITEM_ID]
                if len(logged) == seen:
                    continue
                self.catch_up()
                if all(self._in_index(int(i)) for i in logged):
                    seen = len(logged)
            except Exception as exc:  # noqa: BLE001 - keep serving; the next poll tries again
                if self._stop.is_set():
                    return
                log.warning("new-item poll failed: %s", exc)

    def refresh_replica(self) -> bool:
        """Reload the replica when the collection's row count differs from it (True when reloaded).

        Catches items that other processes (the item-ingest task) upserted into this collection.
        """
        if self.replica is None:
            return False
        rows = int(self.client.get_collection_stats(self.collection).get("row_count", -1))
        if rows == len(self.replica):
            return False
        fresh = index.fetch_all(self.client, self.collection, expected_ids=self.replica.ids)
        with self.write_lock:  # not in the middle of this service's own upsert
            self.replica = Replica(fresh)
        self.replica_reloads += 1
        return True

    # -------------------------------------------------------------------------------------- helpers
    def _restore_new_items(self) -> None:
        self.pending = {int(i) for i in self.log.items(self.dataset)[S.ITEM_ID]}
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

    def _recover_pending_items(self) -> None:
        """Items saved in the log but never encoded (a crash between saving and indexing): encode and index."""
        if self.bundle.uses_content and self.encoder is None:
            return  # `learn index` or the pipeline picks them up
        try:
            done = encode_pending_items(self.cfg, self.dataset, self.log, self.encoder, skip=self.bundle.knows,
                                        with_content=self.bundle.uses_content)
        except Exception as exc:  # noqa: BLE001 - serve anyway; the next `learn index` retries
            log.error("pending items not recovered: %s", exc)
            return
        if done:
            log.info("indexed %d item(s) saved before a restart but not indexed: %s", len(done), done[:10])
            self._restore_new_items()

    def known_item(self, item_id: int) -> bool:
        """An item events may refer to: in the catalogue, in the index, or saved online (here or elsewhere)."""
        item_id = int(item_id)
        if item_id in self.titles or item_id in self.pending or self.bundle.knows(item_id) or self._in_index(item_id):
            return True
        if self.log.item(self.dataset, item_id=item_id) is not None:  # added through another replica
            self.pending.add(item_id)
            return True
        return False

    def _in_index(self, item_id: int) -> bool:
        if self.replica is not None:
            return item_id in self.replica
        return bool(self.client.query(self.collection, ids=[int(item_id)], output_fields=[S.ITEM_ID]))

    def _new_rows(self, ids: np.ndarray, content: np.ndarray, titles: list[str]):
        now = int(time.time())
        return index.ItemRows(item_ids=ids, vectors=self.bundle.new_item_vectors(content),
                              popularity=np.zeros(len(ids), np.int64), first_seen=np.full(len(ids), now, np.int64),
                              is_cold_start=np.ones(len(ids), bool), is_long_tail=np.zeros(len(ids), bool),
                              titles=titles)

    def _search(self, query: np.ndarray, k: int, exclude: set[int]) -> list[dict[str, Any]]:
        if self.replica is not None:
            return self.replica.search(query, k, exclude)
        hits = index.search(self.client, self.collection, query[None, :], k, exclude=[sorted(exclude)],
                            search_params=self.cfg.index.search_params)[0]
        return hits

    def _item_vector(self, item_id: int) -> np.ndarray | None:
        if self.replica is not None:
            return self.replica.vector(item_id)
        got = self.client.query(self.collection, ids=[int(item_id)], output_fields=[index.VECTOR])
        return np.asarray(got[0][index.VECTOR], np.float32) if got else None

    def online_features(self, user_id: int) -> dict[str, Any]:
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
                items = rank(self._search(self.bundle.seed_query(vec), k + len(exclude), exclude), exclude, k)
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
        """Save a new item in the log, encode, index and verify it; returns once a search finds it.

        Its id: the caller's ``item_id``, the id its ``source_id`` got the first time (a retry answers with
        that item, ``created`` False), or the next id of the log's sequence.
        """
        t0 = time.perf_counter()
        if self.bundle.uses_content and self.encoder is None:
            raise ServeError(f"the text encoder is not available: {self.encoder_error}", 503)
        with self.write_lock:
            if self.retired:
                raise Retired(self.bundle.version)
            explicit, source = record.get(S.ITEM_ID), record.get(S.SOURCE_ID) or None
            if source is not None and source in self.sources:
                raise ServeError(f"source_id {source} is catalogue item {self.sources[source]}", 409)
            if explicit is not None and (int(explicit) in self.titles or int(explicit) in self.pending
                                         or self._in_index(int(explicit))):
                raise ServeError(f"item_id {int(explicit)} already exists", 409)
            saved = self.log.item(self.dataset, source_id=source) if source is not None else None
            if saved is not None:
                if explicit is not None and int(explicit) != int(saved[S.ITEM_ID]):
                    raise ServeError(f"source_id {source} is item {int(saved[S.ITEM_ID])}, not {int(explicit)}", 409)
                record = {**record, **{k: v for k, v in saved.items() if v is not None}}
                if self._in_index(int(saved[S.ITEM_ID])):  # a retry of an item already indexed
                    return self._item_answer(int(saved[S.ITEM_ID]), source, created=False, t0=t0, t_enc=t0)
            content = self._encode_new(record)
            t_enc = time.perf_counter()
            created = False
            if saved is None:  # durable before anything is indexed: a crash after this line loses nothing
                try:
                    out = self.log.save_item(self.dataset, record, item_id=explicit, floor=self.catalogue_max_id)
                except eventlog.ItemExists as exc:
                    raise ServeError(str(exc), 409) from exc
                saved, created = out.record, out.created
            item_id = int(saved[S.ITEM_ID])
            record = {**record, S.ITEM_ID: item_id}
            self.pending.add(item_id)
            save_new_item(self.cfg, self.dataset, record, content[0])
            rows = self._new_rows(np.array([item_id]), content, [str(record.get(S.TITLE) or "")])
            index.upsert(self.cfg, self.dataset, rows, target=self.collection, client=self.client)
            if self.replica is not None:
                self.replica.upsert(rows)
            if self.bundle.uses_content:
                self.bundle.extra[item_id] = content[0]
            self.titles[item_id] = str(record.get(S.TITLE) or "")
            self.catalogue_max_id = max(self.catalogue_max_id, item_id)
            self.new_items += 1
        # Recommendable = the serving search returns it for its own vector.
        found = any(h[S.ITEM_ID] == item_id for h in self._search(rows.vectors[0], 10, set()))
        if not found:
            raise ServeError(f"item {item_id} was saved and upserted but a search does not return it yet", 503)
        return self._item_answer(item_id, source, created=created, t0=t0, t_enc=t_enc)

    def _encode_new(self, record: dict[str, Any]) -> np.ndarray:
        if not self.bundle.uses_content:
            return np.zeros((1, 0), np.float32)
        frame = pd.DataFrame([{S.ITEM_ID: int(record.get(S.ITEM_ID) or 0), **{f: record.get(f) for f in NEW_ITEM_FIELDS},
                               S.PRICE: record.get(S.PRICE)}])
        try:
            return encode.encode_items(frame, self.cfg, self.encoder)
        except ValueError as exc:
            raise ServeError(f"item has no text to encode: {exc}", 422) from exc

    def _item_answer(self, item_id: int, source: str | None, created: bool, t0: float, t_enc: float) -> dict[str, Any]:
        t_end = time.perf_counter()
        return {S.ITEM_ID: item_id, S.SOURCE_ID: source, "created": created, "collection": self.collection,
                "recommendable": True, "encode_s": t_enc - t0, "time_to_recommendable_s": t_end - t0,
                S.IS_COLD_START: True}

    def check_events(self, raw_events: Sequence[Any]) -> list[eventlog.Event | events.Rejected]:
        """Each raw event as a log record, or why it is rejected (:func:`events.check_event`)."""
        now, tolerance = eventlog.now_us(), self.cfg.validate_.future_tolerance_s
        return [events.check_event(i, raw, now, tolerance, self.known_item) for i, raw in enumerate(raw_events)]

    def record_events(self, raw_events: Sequence[Any]) -> dict[str, Any]:
        """Check, log and apply a batch of events (``POST /events``); see :meth:`store_events`."""
        return self.store_events(self.check_events(raw_events))

    def store_events(self, checked: Sequence[eventlog.Event | events.Rejected]) -> dict[str, Any]:
        """Log the checked events, then add them to the users' online rows.

        The valid ones are appended to the event log in one durable transaction and only then added to
        the online rows, all under the online lock (``updates.OnlineLock``). An event_id logged before is
        a duplicate: acknowledged again, not stored or applied twice. Returns ``accepted``, ``duplicates``,
        ``rejected`` ([{index, reason}]), ``event_ids`` (of the accepted and duplicate events, in input
        order), ``results`` (per input) and ``features`` (the users' new online rows).
        """
        valid = [c for c in checked if isinstance(c, eventlog.Event)]
        results: list[Any] = list(checked)
        applied: dict[int, dict[str, Any]] = {}
        warning = None
        with self.online_lock():
            appended = self.log.append_events(self.dataset, valid) if valid else []
            new = []
            it = iter(appended)
            for i, c in enumerate(checked):
                if isinstance(c, eventlog.Event):
                    a = next(it)
                    if a.conflict:
                        results[i] = events.Rejected(i, a.conflict, "conflict")
                    else:
                        results[i] = a
                        if not a.duplicate:
                            new.append((c.user_id, c.item_id, c.event_us // 1_000_000))
            if new:
                try:
                    with self.feast_lock:
                        applied = updates.push_events(self.store, new, self.recent, feature_service=self.feature_service)
                except Exception as exc:  # noqa: BLE001 - logged already: the next replay puts them online
                    warning = f"events logged, online features not updated yet: {type(exc).__name__}: {exc}"
                    log.error(warning)
        rejected = [r for r in results if isinstance(r, events.Rejected)]
        stored = [r for r in results if isinstance(r, eventlog.Appended)]
        out = {"accepted": sum(not r.duplicate for r in stored), "duplicates": sum(r.duplicate for r in stored),
               "rejected": [r.as_dict() for r in rejected], "event_ids": [r.event_id for r in stored],
               "results": results, "features": applied}
        if warning:
            out["warning"] = warning
        return out

    def record_event(self, user_id: int, item_id: int, when: datetime | None = None,
                     event_id: str | None = None) -> dict[str, Any]:
        """One event (see :meth:`record_events`); a rejected one raises ``ServeError`` (404: unknown item)."""
        raw = {S.USER_ID: int(user_id), S.ITEM_ID: int(item_id)}
        if when is not None:
            raw[S.EVENT_TIMESTAMP] = S.to_utc(when).isoformat()
        if event_id is not None:
            raw["event_id"] = event_id
        out = self.record_events([raw])
        res = out["results"][0]
        if isinstance(res, events.Rejected):
            raise ServeError(res.reason, {events.UNKNOWN_ITEM: 404, "conflict": 409}.get(res.kind, 422))
        return self.single_event_answer(out, raw)

    def single_event_answer(self, out: dict[str, Any], raw: Any) -> dict[str, Any]:
        """The answer to a one-event POST /events: the batch answer plus that event's user features."""
        res = out["results"][0]
        user = int(raw[S.USER_ID])
        feats = out["features"].get(user)
        if feats is None:
            feats = self.online_features(user)
        answer = {k: out[k] for k in ("accepted", "duplicates", "rejected", "event_ids")}
        answer.update({S.USER_ID: user, S.ITEM_ID: int(raw[S.ITEM_ID]), "event_id": res.event_id, "recorded": True,
                       "duplicate": res.duplicate, "history_length": len(feats.get(S.RECENT_ITEM_IDS) or []),
                       S.EVENT_COUNT: int(feats.get(S.EVENT_COUNT) or 0)})
        if "warning" in out:
            answer["warning"] = out["warning"]
        return answer

    def health(self) -> dict[str, Any]:
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
        try:
            checks["eventlog"] = {**self.log.describe(), "landed_upto": self.log.watermark(self.dataset),
                                  "status": "ok"}
        except Exception as exc:  # noqa: BLE001
            checks["eventlog"] = {"status": f"error: {exc}"}
        checks["replay"] = self.replayed
        checks["model"] = {"version": self.bundle.version, "kind": self.bundle.kind, "status": "ok"}
        checks["encoder"] = "ok" if self.encoder is not None else (self.encoder_error or "not needed")
        ok = checks["feast"] == "ok" and checks["milvus"] == "ok" and checks["eventlog"]["status"] == "ok"
        return {"status": "ok" if ok else "degraded", "dataset": self.dataset, "search": self.cfg.serve.search,
                "new_items": self.new_items, "replica_reloads": self.replica_reloads, "startup_s": self.started_s,
                "checks": checks}
