"""The online recommendation service: Feast recent items -> content embeddings -> user tower -> Milvus.

``create_app(cfg)`` builds a FastAPI app that serves the dataset's current release and follows the release
record (``follow.ReleaseFollower``): each release is one :class:`~learn_tasks.online.recommender.Recommender`
(the release's model, its content embeddings, the frozen text encoder for new items, the Feast store and
the release's Milvus collection), and a new release is loaded beside the serving one and swapped in
without a restart; requests in flight finish on the old one. Before any release, the most consumed items
of the catalogue answer (``popular``) and ``/health`` says ``degraded``, ``no model yet`` (HTTP 200).

``GET /recommendations/{user_id}`` reads the user's last L item ids from the Feast online store, runs
them through the user tower and returns the nearest items by inner product (``recommender.py`` has the
request path). Search runs against Milvus itself (``serve.search=milvus``) or against an in-process
replica of the released collection (``serve.search=replica``, the default; ``replica.py`` says why). With
a Milvus server, ``milvus`` is the natural choice.

Users the online store does not know, or whose history has no usable item, get an explicit fallback:
``content_based_seed`` when ``seed_item`` is given (nearest items to that item), else ``popular``; the
response says which strategy answered and why.

``POST /items`` (Bearer token) saves a new item in the event log (its id from the log's sequence, the
caller's ``item_id``, or the id its ``source_id`` got before), encodes it with the frozen LLM and the
item tower, upserts it into the released collection (and the replica) and checks that a search finds it
before answering, so it is recommendable when the response arrives. ``POST /events`` (Bearer token)
takes one event or ``{"events": [...]}``: each is checked, the valid ones are appended to the durable
event log, then added to the users' online features, and only then does the service answer with the
ids it accepted and why it rejected the others. Every recommendation response (or a sample) is written
to the served-recommendation log. ``/health`` checks the release, model, Feast, Milvus and the event
log; ``/metrics`` is Prometheus text.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learn_tasks.config import Settings
from learn_tasks.data import eventlog
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.data.validation import SOURCE_ID_REGEX
from learn_tasks.online import events, explorer, index, milvus_server, releases
from learn_tasks.online.bundle import NEW_ITEM_FIELDS
from learn_tasks.online.follow import ReleaseFollower
from learn_tasks.online.recommender import Recommender, Retired, ServeError

if TYPE_CHECKING:
    from fastapi import FastAPI

INT64_MAX = 2**63 - 1


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
    reason: str | None = Field(description="why a fallback answered: unknown user | no usable history | no model yet")
    history_length: int
    model_version: str | None = Field(description="the released model that answered (null: no model yet)")
    index_collection: str | None
    items: list[RecommendedItem]
    timing_ms: dict[str, float]


class NewItem(BaseModel):
    """Body of POST /items: the item's text fields (what the encode template reads)."""

    model_config = ConfigDict(extra="forbid")
    item_id: int | None = Field(None, ge=0, le=INT64_MAX, description="omit to get the next id of the sequence")
    source_id: str | None = Field(None, max_length=200, pattern=SOURCE_ID_REGEX,
                                  description="your own id of the item: posting it again answers with the same item")
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
    """One event of POST /events (documentation: the service checks each event itself and rejects bad ones
    with a reason)."""

    user_id: int = Field(..., ge=0, le=INT64_MAX)
    item_id: int = Field(..., ge=0, le=INT64_MAX, description="a catalogue item or one added online")
    event_timestamp: str | float | None = Field(None, description="ISO 8601 or unix seconds; default: now (UTC); "
                                                                  "at most validate.future_tolerance_s ahead")
    event_id: str | None = Field(None, description="your id of the event (1-128 of A-Za-z0-9_.:-): sending it "
                                                   "again is a duplicate, never a second event; default: a new id")


class EventsAnswer(BaseModel):
    accepted: int = Field(description="events stored now")
    duplicates: int = Field(description="events whose event_id was stored before (acknowledged, not stored again)")
    rejected: list[dict[str, Any]] = Field(description="[{index, reason}] of the events not stored")
    event_ids: list[str] = Field(description="ids of the accepted and duplicate events, in input order")


def create_app(cfg: Settings, dataset: str | None = None, recommender: Recommender | None = None) -> "FastAPI":
    """The FastAPI app. The current release (if any) is loaded here; the app then follows the release record
    (from start-up to shutdown). A given ``recommender`` is served as it is, without following."""
    from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path as PathParam, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    follower = None
    if recommender is None:
        follower = ReleaseFollower(cfg, dataset)
        follower.check()  # the current release now, or the catalogue fallback with the reason
    serving = (lambda: recommender) if follower is None else (lambda: follower.serving)
    opened: list[eventlog.EventLog] = []  # the app's own handle on the log, for the served records

    def open_served_log() -> eventlog.EventLog:
        if not opened:
            opened.append(open_log(cfg))
        return opened[0]

    served_log = events.ServedLog(lambda: (open_served_log(), serving().dataset), cfg.eventlog.served_sample,
                                  cfg.eventlog.served_flush_s)
    token = os.environ.get(cfg.serve.token_env) or None
    metrics = CollectorRegistry()  # per app: several apps (tests) never share counters
    m_requests = Counter("learn_http_requests_total", "HTTP requests", ["endpoint", "status"], registry=metrics)
    m_latency = Histogram("learn_http_request_seconds", "Request latency", ["endpoint"], registry=metrics,
                          buckets=(.002, .005, .01, .02, .03, .05, .075, .1, .2, .5, 1, 2, 5))
    m_strategy = Counter("learn_recommendations_total", "Recommendation responses by strategy", ["strategy"],
                         registry=metrics)
    m_new_item = Histogram("learn_new_item_seconds", "New item: request to recommendable", registry=metrics,
                           buckets=(.01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
    m_events = Counter("learn_events_total", "Events received by POST /events, by outcome", ["outcome"],
                       registry=metrics)
    m_items = Gauge("learn_index_items", "Rows of the serving index", registry=metrics)
    m_items.set_function(lambda: len(r.replica) if getattr(r := serving(), "replica", None) is not None
                         else float("nan"))
    if follower is not None:
        m_release = Gauge("learn_release_id", "Release served (NaN: none yet)", registry=metrics)
        m_release.set_function(lambda: follower.release["release_id"] if follower.release else float("nan"))
        m_swaps = Gauge("learn_release_swaps", "Releases swapped in since start-up", registry=metrics)
        m_swaps.set_function(lambda: follower.swaps)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if follower is not None:
            follower.start()
        yield
        served_log.close()
        for handle in opened:
            handle.close()
        if follower is not None:
            follower.stop()
        else:
            recommender.close()

    app = FastAPI(title="learn recommendations",
                  description="LEARN recommendations: Feast features -> frozen-LLM content -> user tower -> Milvus.",
                  version="1", lifespan=lifespan)
    # The explorer reads the recommender being served (None while none is) and the follower's state.
    app.state.recommender = recommender if follower is None else follower.recommender
    app.state.live = follower
    app.state.served_log = served_log
    if follower is not None:
        follower.listeners.append(lambda rec: setattr(app.state, "recommender", rec))
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
                                                      description="fallback seed for users without history"),
                        x_request_id: str | None = Header(None, description="your request id (else a new one); "
                                                                             "echoed and kept in the served log")):
        out = serving().recommend(user_id, k, seed_item)  # read once: a swap meanwhile does not affect it
        m_strategy.labels(out["strategy"]).inc()
        out["request_id"] = request_id(x_request_id)
        served_log.record(out, out["request_id"])
        # plain dicts of JSON types: skip FastAPI's generic re-encoding
        return JSONResponse(out, headers={"X-Request-ID": out["request_id"]})

    @app.post("/items", status_code=201, dependencies=[Depends(require_token)],
              summary="Register a new item: saved, encoded, indexed and recommendable when this returns")
    def add_item(item: NewItem):
        # The limits the pipeline's item validation applies when it lands the item from the log.
        v = cfg.validate_
        if len(item.title or "") > v.max_title_chars:
            raise ServeError(f"title is longer than validate.max_title_chars = {v.max_title_chars}", 422)
        if sum(len(getattr(item, f) or "") for f in NEW_ITEM_FIELDS) > v.max_text_chars:
            raise ServeError(f"the item's text is longer than validate.max_text_chars = {v.max_text_chars}", 422)
        for attempt in range(3):
            try:
                out = serving().add_item(item.model_dump())
                break
            except Retired:  # a newer release took over while this request waited: write it there
                if attempt == 2:
                    raise
        m_new_item.observe(out["time_to_recommendable_s"])
        # 200: this source_id was registered before, and the answer is that item
        return out if out["created"] else JSONResponse(out, status_code=200)

    @app.post("/events", status_code=202, dependencies=[Depends(require_token)], response_model=None,
              summary="Record user events: checked, appended to the durable event log, then to the online features",
              responses={202: {"model": EventsAnswer}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "oneOf": [Event.model_json_schema(), {
                      "title": "EventBatch", "type": "object", "required": ["events"], "additionalProperties": False,
                      "properties": {"events": {"type": "array", "items": Event.model_json_schema(),
                                                "maxItems": cfg.eventlog.max_batch}}}]}}}}})
    def add_events(payload: Any = Body(..., openapi_examples=EVENT_EXAMPLES)):
        chosen: list[Recommender] = []

        def rec() -> Recommender:
            """The release serving this request, read once (only when the events are well-formed)."""
            if not chosen:
                current = serving()
                if not isinstance(current, Recommender):
                    raise ServeError(f"{current.reason()}: events are recorded once a release is served", 503)
                chosen.append(current)
            return chosen[0]

        def known(item_id: int) -> bool:
            return rec().known_item(item_id)

        now, tolerance = eventlog.now_us(), cfg.validate_.future_tolerance_s
        if isinstance(payload, dict) and "events" in payload:
            if set(payload) != {"events"} or not isinstance(payload["events"], list):
                raise ServeError('a batch is {"events": [event, ...]}', 422)
            if len(payload["events"]) > cfg.eventlog.max_batch:
                raise ServeError(f"{len(payload['events'])} events in one request; at most eventlog.max_batch = "
                                 f"{cfg.eventlog.max_batch}", 413)
            out = rec().store_events([events.check_event(i, raw, now, tolerance, known)
                                    for i, raw in enumerate(payload["events"])])
            m_events.labels("accepted").inc(out["accepted"])
            m_events.labels("duplicate").inc(out["duplicates"])
            m_events.labels("rejected").inc(len(out["rejected"]))
            return JSONResponse({k: v for k, v in out.items() if k not in ("results", "features")}, status_code=202)
        # One event: a rejected one keeps its 4xx (422 malformed, 404 unknown item, 409 reused event_id).
        checked = events.check_event(0, payload, now, tolerance, known)
        res = checked
        if isinstance(checked, eventlog.Event):
            out = rec().store_events([checked])
            res = out["results"][0]
        if isinstance(res, events.Rejected):
            m_events.labels("rejected").inc()
            status = {events.UNKNOWN_ITEM: 404, "conflict": 409}.get(res.kind, 422)
            return JSONResponse({"detail": res.reason, "accepted": 0, "duplicates": 0, "rejected": [res.as_dict()],
                                 "event_ids": []}, status_code=status)
        m_events.labels("duplicate" if res.duplicate else "accepted").inc()
        return JSONResponse(rec().single_event_answer(out, payload), status_code=202)

    @app.get("/health", summary="Release, model, Feast and Milvus checks")
    def health():
        if follower is not None:
            out, code = follower.health()
            return JSONResponse(out, status_code=code)
        out = recommender.health()
        return JSONResponse(out, status_code=200 if out["status"] == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


EVENT_EXAMPLES = {
    "one": {"summary": "one event", "value": {"user_id": 1234, "item_id": 38620}},
    "batch": {"summary": "a batch, with client event ids", "value": {"events": [
        {"user_id": 1234, "item_id": 38620, "event_timestamp": "2024-05-01T12:00:00Z", "event_id": "app-1-0001"},
        {"user_id": 1234, "item_id": 20417, "event_id": "app-1-0002"}]}},
}


def request_id(given: str | None) -> str:
    """The caller's X-Request-ID (when it is a sane token), else a new one."""
    if given and len(given) <= 128 and given.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return given
    return uuid.uuid4().hex


log = logging.getLogger("learn.serve")
WORKER_ENV = "LEARN_SERVE_WORKER_SETTINGS"  # settings + dataset of the worker processes (JSON)


def worker_count(cfg: Settings, workers: int | None = None) -> int:
    """``workers``, else ``serve.workers``, else (0) one per CPU core this process may use, at most 4: a request
    is CPU under one interpreter lock, so a process per core serves the most at the latency of one."""
    n = int(workers or cfg.serve.workers)
    return n if n > 0 else max(1, min(4, len(os.sched_getaffinity(0))))


def die_with_parent() -> None:
    """Linux: this worker is killed when its parent dies. A supervisor that is stopped in order stops its
    workers itself; one that is killed (SIGKILL, out of memory) takes them down with it at once, as one
    service, instead of leaving workers that keep its port without a supervisor. Whatever they were
    answering is unacknowledged, so clients send it again (event ids make that safe)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's process group stop still applies
        pass
    if os.getppid() == 1:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGKILL)


def worker_app() -> "FastAPI":
    """The app of one worker process (``serve.workers`` > 1): uvicorn imports and calls this in each worker."""
    die_with_parent()
    spec = json.loads(os.environ[WORKER_ENV])
    return create_app(Settings.model_validate(spec["settings"]), spec["dataset"])


def preload_release(cfg: Settings, dataset: str | None) -> None:
    """Load the current release's collection once, before several workers start. Milvus Lite forgets what
    was loaded when its server starts, and workers loading one collection at the same moment can leave one
    of them reading it as released (it then serves popular items until ``serve.release_retry_s``)."""
    try:
        rel = releases.current(cfg, dataset or cfg.serve.dataset or cfg.pipeline.dataset)
        if rel is not None:
            index.ensure_loaded(index.connect(cfg), rel["collection"])
            index.close(cfg)
    except Exception as exc:  # noqa: BLE001 - the workers load it themselves and report what fails
        log.warning("could not load the release's collection before the workers start: %s", exc)


def serve_api(cfg: Settings, dataset: str | None = None, host: str | None = None, port: int | None = None,
              workers: int | None = None) -> None:
    """Serve the releases of ``dataset`` with uvicorn, following each new one (blocks until stopped).

    With ``workers`` (default :func:`worker_count`) above 1, uvicorn runs that many worker processes on one
    socket; they share nothing but the stores: the event log (SQLite WAL or PostgreSQL), the Feast online
    store (writes under the per-dataset online lock) and Milvus, which with Milvus Lite is then served by
    its local server (``learn index server start``, started here when it does not run) so every worker
    reaches it by URI.
    """
    import uvicorn

    host, port = host or cfg.serve.host, int(port or cfg.serve.port)
    workers = worker_count(cfg, workers)
    if workers <= 1:
        uvicorn.run(create_app(cfg, dataset), host=host, port=port, log_level="warning", access_log=False)
        return
    # Milvus Lite in-process allows one process: share it through the local server (no-op when it runs).
    started = milvus_server.start(cfg).get("started") if not cfg.index.uri else False
    preload_release(cfg, dataset)
    os.environ[WORKER_ENV] = json.dumps({"settings": cfg.model_dump(mode="json", by_alias=True), "dataset": dataset})
    try:
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, host=host, port=port,
                    log_level="warning", access_log=False)
    finally:
        if started:  # started for this service: stopped with it (one started before keeps running)
            milvus_server.stop(cfg)
