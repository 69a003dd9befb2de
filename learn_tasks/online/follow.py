"""The service follows releases: it serves the current release and swaps in each new one without a restart.

A :class:`ReleaseFollower` reads the dataset's release record (:mod:`learn_tasks.online.releases`) at
start-up and then every ``serve.release_poll_s``. For a new release it builds a complete
:class:`~learn_tasks.online.recommender.Recommender` (model, replica and index of that release) next to the
one serving, then swaps it in with one reference assignment: a request reads the reference once, so
requests in flight finish on the old release (its collection is kept: pruning never drops the previous
release's), and the next request gets the new one. The text encoder and the Feast lock carry over.
Writes that reach the old recommender after the swap are sent to the new one; items it added while the
new one loaded are indexed into the new collection right after the swap (``Recommender.catch_up``).

A home indexed before release records existed has a promoted model and an alias but no record: at
start-up the collection the alias points at is served as release 0 (when complete and its model run is
there), until the next release is written.

Until a release can be served (none yet, or its model cannot be loaded), a :class:`CatalogueFallback`
answers: the most consumed items of the prepared dataset (``popular``), or an empty list with the reason
when the dataset has no data yet. ``/health`` then says ``degraded`` with ``no model yet: <why>`` and HTTP
200: the process is up and answering, and it never exits for lack of a model. A release that fails to
load is reported on ``/health`` and tried again after ``serve.release_retry_s``; whatever served before
keeps serving.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.pch import registry
from learn_tasks.online import index, releases
from learn_tasks.online.recommender import STRATEGY_POPULAR, Recommender, ServeError, item_payload, popular_fallback

log = logging.getLogger("learn.serve")

NO_MODEL = "no model yet"


class CatalogueFallback:
    """What answers while no release is served: popular items of the catalogue, no writes."""

    replica = None
    bundle = None
    collection = None

    def __init__(self, cfg: Settings, dataset: str, why: Callable[[], str | None]):
        self.cfg, self.dataset, self._why = cfg, dataset, why
        self.popular: list[dict[str, Any]] = []
        self.data_note: str | None = "not looked at yet"
        self.loaded = False  # counted when first needed: a service that starts on a release never reads them

    def refresh(self) -> None:
        """Count events per item in the prepared dataset (most consumed first); note why when there are none."""
        if self.popular:
            return
        self.loaded = True
        try:
            inter = data.load_interactions(self.cfg, self.dataset)
            items = data.load_items(self.cfg, self.dataset)
        except Exception as exc:  # noqa: BLE001 - no data yet is a state to report, not a crash
            self.data_note = f"no data for dataset {self.dataset!r} yet ({type(exc).__name__}: {exc})"
            return
        titles = dict(zip(items[S.ITEM_ID].astype(int), items[S.TITLE].fillna("").astype(str))) \
            if S.TITLE in items else {}
        counts = inter[S.ITEM_ID].value_counts(sort=False).sort_index(kind="stable").sort_values(
            ascending=False, kind="stable")
        top = counts.iloc[: self.cfg.serve.max_k + 1000]
        self.popular = [{S.ITEM_ID: int(i), "score": float(n), S.TITLE: titles.get(int(i)) or None,
                         S.IS_COLD_START: False, S.IS_LONG_TAIL: False} for i, n in top.items()]
        self.data_note = None if self.popular else f"dataset {self.dataset!r} has no events yet"

    def reason(self) -> str:
        return f"{NO_MODEL}: {self._why() or 'no release'}"

    def recommend(self, user_id: int, k: int, seed_item: int | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if not self.loaded:
            self.refresh()
        items = popular_fallback(self.popular, set(), k)
        total = 1000 * (time.perf_counter() - t0)
        return {S.USER_ID: int(user_id), "k": int(k), "strategy": STRATEGY_POPULAR, "fallback": True,
                "reason": NO_MODEL if items else f"{NO_MODEL}: {self.data_note}", "history_length": 0,
                "model_version": None, "index_collection": None, "items": [item_payload(c) for c in items],
                "timing_ms": {"features": 0.0, "user_tower": 0.0, "search": total, "total": total}}

    def add_item(self, record: dict[str, Any]) -> dict[str, Any]:
        raise ServeError(f"{self.reason()}: items can be added once a release is served", 503)

    def record_event(self, user_id: int, item_id: int, when: Any) -> dict[str, Any]:
        raise ServeError(f"{self.reason()}: events are recorded once a release is served", 503)

    def close(self) -> None:
        pass


class ReleaseFollower:
    """Serves the dataset's current release and swaps in each new one (see the module docstring)."""

    def __init__(self, cfg: Settings, dataset: str | None = None):
        self.cfg = cfg
        self.dataset = dataset or cfg.serve.dataset or cfg.pipeline.dataset
        self.release: dict[str, Any] | None = None  # the record being served
        self.status, self.reason = "starting", "looking for a release"
        self.fallback = CatalogueFallback(cfg, self.dataset, lambda: self.reason)
        self._current: Recommender | CatalogueFallback = self.fallback
        self.failures: dict[int, tuple[float, str]] = {}  # release id -> (when, error) of a failed load
        self.swaps = 0
        self.checked_at: float | None = None
        self.last_swap_s: float | None = None
        self.listeners: list[Callable[[Recommender], None]] = []  # called with each recommender swapped in
        self.feast_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ serving
    @property
    def serving(self) -> Recommender | CatalogueFallback:
        """What answers the next request: read it once per request."""
        return self._current

    @property
    def recommender(self) -> Recommender | None:
        cur = self._current
        return cur if isinstance(cur, Recommender) else None

    # ------------------------------------------------------------------------------------ following
    def check(self, force: bool = False) -> str:
        """One look at the release record: swap in a new release when there is one. Returns the status.

        ``force`` retries a release that failed to load before ``serve.release_retry_s`` passed.
        """
        with self._check_lock:
            try:
                rel = releases.current(self.cfg, self.dataset)
                if rel is None and self.checked_at is None:
                    rel = self._alias_release()  # at start-up, in a home indexed before release records existed
            except (OSError, ValueError) as exc:  # unreadable record or state database down: keep serving
                log.warning("cannot read the release record of %s: %s", self.dataset, exc)
                if self.recommender is None:
                    self.status, self.reason = "degraded", f"cannot read the release record: {exc}"
                return self.status
            self.checked_at = time.time()
            if rel is None:
                if self.recommender is None:
                    self.fallback.refresh()
                    self.status, self.reason = "degraded", (
                        f"no release for dataset {self.dataset!r} yet: run learn_pipeline (or `learn index "
                        f"--dataset {self.dataset}`) to train, index and release a model")
                return self.status
            if self.release is not None and releases.same(rel, self.release):
                self.release = rel  # the same model and collection released again: nothing to load
                return self.status
            rid = int(rel["release_id"])
            failed = self.failures.get(rid)
            if failed is not None and not force and time.time() - failed[0] < self.cfg.serve.release_retry_s:
                return self.status
            self._load(rel)
            return self.status

    def _alias_release(self) -> dict[str, Any] | None:
        """A home indexed before release records existed (a promoted model, no release ever written): the
        collection the alias points at, served as release 0 (nothing is written) when it is complete and
        its model run is here. Looked at once, at start-up; the next release written replaces it."""
        if registry.promoted(self.cfg, self.dataset) is None or releases.history(self.cfg, self.dataset):
            return None
        try:
            client = index.connect(self.cfg)
            name = index.current(self.cfg, self.dataset, client)
            version = index.verify_collection(client, name).get("version") if name else None
        except Exception as exc:  # noqa: BLE001 - nothing to adopt: wait for a release
            log.warning("no release record for %s, and the index alias cannot be served: %s", self.dataset, exc)
            return None
        if not version or registry.find_run(self.cfg, self.dataset, version) is None:
            return None
        return {"release_id": 0, "dataset": self.dataset, "model_version": version, "collection": name,
                "source": "the index alias (no release record yet)", "previous": None}

    def _load(self, rel: dict[str, Any]) -> None:
        rid, version = int(rel["release_id"]), rel["model_version"]
        old = self.recommender
        t0 = time.perf_counter()
        try:
            new = Recommender(self.cfg, self.dataset, release=rel, feast_lock=self.feast_lock,
                              encoder_model=old.encoder if old is not None else None)
        except Exception as exc:  # noqa: BLE001 - reported on /health, retried later; serving goes on
            msg = f"{type(exc).__name__}: {exc}"
            self.failures[rid] = (time.time(), msg)
            log.error("cannot serve release %d (model %s): %s", rid, version, msg)
            if old is None:
                self.fallback.refresh()
                self.status, self.reason = "degraded", f"release {rid} (model {version}) cannot be served: {msg}"
            return
        self._current, self.release = new, rel  # the swap: the next request reads the new one
        for listener in self.listeners:  # at once, so every page of the service names the model it serves
            listener(new)
        if old is not None:
            old.retire()  # waits for a write in progress; later writes go to the new one
        new.catch_up()
        self.failures.pop(rid, None)
        self.swaps += 1
        self.last_swap_s = time.perf_counter() - t0
        self.status, self.reason = "ok", None
        if old is not None:
            old.close()
        log.info("serving release %d of %s: model %s, collection %s (loaded in %.1f s)", rid, self.dataset,
                 version, rel["collection"], self.last_swap_s)

    def watch(self) -> None:
        while not self._stop.wait(self.cfg.serve.release_poll_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("release watcher")

    def start(self) -> None:
        """Watch the release record in a background thread (every ``serve.release_poll_s``; 0 = never)."""
        if self.cfg.serve.release_poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self.watch, name="learn-release-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._current.close()

    # ------------------------------------------------------------------------------------ reporting
    def describe(self) -> dict[str, Any]:
        rel = self.release
        return {"status": self.status, "reason": self.reason, "dataset": self.dataset,
                "release_id": rel["release_id"] if rel else None,
                "model_version": rel["model_version"] if rel else None,
                "collection": rel["collection"] if rel else None, "released_at": rel.get("released_at") if rel else None,
                "swaps": self.swaps, "last_swap_s": self.last_swap_s, "checked_at": self.checked_at,
                "poll_s": self.cfg.serve.release_poll_s,
                "failed_releases": {str(r): e for r, (_, e) in self.failures.items()}}

    def health(self) -> tuple[dict[str, Any], int]:
        """(body, HTTP status) of ``/health``: the release's checks (200 ok / 503 when one fails), or 200
        ``degraded`` with ``no model yet: <why>`` while the catalogue fallback answers."""
        rec = self.recommender
        if rec is None:
            return {"status": "degraded", "reason": self.fallback.reason(), "dataset": self.dataset,
                    "strategy": STRATEGY_POPULAR, "popular_items": len(self.fallback.popular),
                    "data": self.fallback.data_note, "release": self.describe()}, 200
        out = rec.health()
        out["release"] = self.describe()
        return out, 200 if out["status"] == "ok" else 503
