"""The service process of ``learn up``: the recommendation service behind a wrapper that answers before
any model exists and swaps in each newly promoted *and* indexed model without a restart.

Started as ``learn serve --follow``; :class:`LiveService` is an ASGI app around
:func:`learn_tasks.online.service.create_app`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from learn_tasks.config import Settings
from learn_tasks.online import explorer, index
from learn_tasks.online import service as serve
from learn_tasks.pch import registry

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("learn.stack")


class LiveService:
    """An ASGI app that serves the promoted model of ``dataset`` and follows the pipeline.

    The service proper (:func:`learn_tasks.online.service.create_app`) pins one model version and its index
    collection at start-up and refuses to start without them. Here a watcher thread looks every
    ``stack.reload_poll_s`` for a promoted model whose collection the alias points at (so the pipeline
    finished ``load_milvus``), builds a new app for it next to the running one and swaps it in; requests
    in flight finish on the old one. Until the first model exists, a small placeholder app answers:
    ``/health`` (503, ``status: waiting`` with the reason), the explorer page (it shows the reason), and
    503 with the reason for everything else.
    """

    def __init__(self, cfg: Settings, dataset: str, build: Callable[[Settings, str], "FastAPI"] | None = None):
        self.cfg, self.dataset = cfg, dataset
        self._build = build or _build_service_app
        self.current: tuple[str, "FastAPI"] | None = None  # (model version, app)
        self.status = "loading"
        self.reason: str | None = "looking for a promoted model"
        self.failures: dict[str, tuple[float, str]] = {}  # version -> (when, error) of a failed build
        self.swaps = 0
        self.checked_at: float | None = None
        self.placeholder = _placeholder_app(self)
        self._check_lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------ watching
    def target(self) -> tuple[str | None, str | None]:
        """(version to serve, None) or (None, why nothing new can be served yet)."""
        run = registry.promoted(self.cfg, self.dataset)
        if run is None:
            return None, (f"no promoted model for dataset {self.dataset!r} yet: trigger learn_pipeline "
                          f"(dataset {self.dataset}) in Airflow")
        try:
            live = index.current(self.cfg, self.dataset, index.connect(self.cfg))
        except Exception as exc:  # noqa: BLE001 - Milvus down: keep serving what we have
            return None, f"cannot read the index alias: {exc}"
        if live != index.collection_name(self.dataset, run.name):
            return None, f"promoted model {run.name} is not indexed yet (the alias points at {live})"
        return run.name, None

    def check(self) -> str:
        """One look: swap in a newer servable model if there is one. Returns the status."""
        with self._check_lock:
            self.checked_at = time.time()
            version, why = self.target()
            if version is None or (self.current is not None and self.current[0] == version):
                if self.current is None:
                    self.status, self.reason = "waiting", why
                return self.status
            failed = self.failures.get(version)
            if failed is not None and time.time() - failed[0] < 60.0:  # do not rebuild a broken model in a loop
                return self.status
            if self.current is None:
                self.status, self.reason = "loading", f"loading model {version}"
            t0 = time.perf_counter()
            try:
                app = self._build(self.cfg, self.dataset)
            except Exception as exc:  # noqa: BLE001 - reported on /health and the explorer, retried later
                msg = f"{type(exc).__name__}: {exc}"
                self.failures[version] = (time.time(), msg)
                log.error("cannot serve model %s: %s", version, msg)
                if self.current is None:
                    self.status, self.reason = "waiting", f"model {version} cannot be served: {msg}"
                return self.status
            rec = getattr(app.state, "recommender", None)
            served = getattr(getattr(rec, "bundle", None), "version", version)
            app.state.live = self
            previous, self.current = self.current, (served, app)
            self.swaps += 1
            if previous is not None:  # requests in flight finish on it; its background work stops now
                _close_app(previous[1])
            self.status, self.reason = "ok", None
            log.info("serving model %s of %s (built in %.1f s)", served, self.dataset, time.perf_counter() - t0)
            return self.status

    def watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("model watcher")
            self._stop.wait(self.cfg.stack.reload_poll_s)

    def start_watching(self) -> threading.Thread:
        thread = threading.Thread(target=self.watch, name="learn-model-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            _close_app(self.current[1])

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "dataset": self.dataset,
                "model_version": self.current[0] if self.current else None, "swaps": self.swaps,
                "checked_at": self.checked_at, "poll_s": self.cfg.stack.reload_poll_s,
                "failed_builds": {v: e for v, (_, e) in self.failures.items()}}

    # ------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to set up: the watcher runs in its own thread
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        current = self.current
        app = current[1] if current is not None else self.placeholder
        await app(scope, receive, send)


def _close_app(app: "FastAPI") -> None:
    close = getattr(getattr(app.state, "recommender", None), "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def _build_service_app(cfg: Settings, dataset: str) -> "FastAPI":
    return serve.create_app(cfg, dataset)


def _placeholder_app(live: LiveService) -> "FastAPI":
    """What answers while no model can be served: health with the reason, the explorer, 503 elsewhere."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="learn recommendations (waiting for a model)", docs_url=None, redoc_url=None)
    app.state.recommender = None
    app.state.live = live
    app.include_router(explorer.router)

    @app.get("/health")
    def health():
        return JSONResponse({"status": live.status if live.status == "loading" else "waiting",
                             "reason": live.reason, "dataset": live.dataset}, status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def not_yet(path: str):
        return JSONResponse({"detail": f"no model is served yet: {live.reason}"}, status_code=503)

    return app


def serve_live(cfg: Settings, dataset: str, host: str, port: int) -> None:
    """Run the live service with uvicorn (blocks until stopped)."""
    import uvicorn

    live = LiveService(cfg, dataset)
    live.start_watching()
    uvicorn.run(live, host=host, port=int(port), log_level="warning", access_log=False, lifespan="on")
