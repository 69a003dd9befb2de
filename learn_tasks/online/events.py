"""What the service writes to the event log: checked user events, and the served-recommendation log.

:func:`check_event` validates one event of a ``POST /events`` body the way the pipeline's validation
would reject it later (id types, a known or pending item, a time not beyond
``validate.future_tolerance_s``), so an event the service acknowledges is one the pipeline accepts,
and an event it rejects comes back with a reason.

:class:`ServedLog` writes one record per recommendation response (or a sample of
``eventlog.served_sample``) to the log's ``served`` stream from a background thread, in batches every
``eventlog.served_flush_s``: the request path only queues a small dict. A process killed hard loses at
most the records of the last flush interval; the event log itself is written before each answer.
"""
from __future__ import annotations

import logging
import math
import queue
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from learn_tasks import schema as S
from learn_tasks.data import eventlog

log = logging.getLogger("learn.serve")

INT64_MAX = 2**63 - 1
EVENT_KEYS = (S.USER_ID, S.ITEM_ID, S.EVENT_TIMESTAMP, "event_id")
UNKNOWN_ITEM, INVALID = "unknown_item", "invalid"


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str
    kind: str = INVALID  # invalid | unknown_item | conflict

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        return None
    return value


def parse_time(value: Any) -> int | None:
    """Unix seconds (number or digits) or ISO 8601 text (naive = UTC) -> epoch microseconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        value = float(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value >= 1e11:
            return None
        return int(round(value * 1_000_000))
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        if ts.year < 1970:
            return None
        return eventlog.to_us(ts)
    return None


def check_event(index: int, raw: Any, now_us: int, future_tolerance_s: float,
                known_item: Callable[[int], bool]) -> eventlog.Event | Rejected:
    """One event of a request body as a log record, or why it is rejected."""
    if not isinstance(raw, Mapping):
        return Rejected(index, "an event is a JSON object with user_id, item_id, and optionally event_timestamp "
                               "and event_id")
    extra = sorted(set(raw) - set(EVENT_KEYS))
    if extra:
        return Rejected(index, f"unknown field(s) {', '.join(map(str, extra))}; an event has {', '.join(EVENT_KEYS)}")
    user = _int_id(raw.get(S.USER_ID))
    if user is None:
        return Rejected(index, f"user_id must be an integer in [0, 2^63-1], got {raw.get(S.USER_ID)!r}")
    item = _int_id(raw.get(S.ITEM_ID))
    if item is None:
        return Rejected(index, f"item_id must be an integer in [0, 2^63-1], got {raw.get(S.ITEM_ID)!r}")
    stamp = raw.get(S.EVENT_TIMESTAMP)
    if stamp is None:
        when, timed = now_us, False
    else:
        when, timed = parse_time(stamp), True
        if when is None:
            return Rejected(index, f"event_timestamp must be ISO 8601 or unix seconds, got {stamp!r}")
        limit = now_us + int(future_tolerance_s * 1_000_000)
        if when > limit:
            return Rejected(index, f"event_timestamp {stamp!r} is in the future (more than "
                                   f"validate.future_tolerance_s = {future_tolerance_s:g} s ahead of the server clock)")
    event_id = raw.get("event_id")
    if event_id is None:
        event_id = eventlog.new_event_id()
    elif not isinstance(event_id, str) or not eventlog.EVENT_ID_REGEX.match(event_id):
        return Rejected(index, f"event_id must be 1 to 128 characters of A-Z a-z 0-9 _ . : - (starting with a "
                               f"letter or digit), got {event_id!r}")
    if not known_item(item):
        return Rejected(index, f"item_id {item} is not in the catalogue (nor added online)", UNKNOWN_ITEM)
    return eventlog.Event(event_id=event_id, user_id=user, item_id=item, event_us=when, timed=timed)


class ServedLog:
    """Served-recommendation records, queued by the request path and written in batches by a thread.

    ``target`` gives the log and dataset to write to when a batch is written (so a service that swaps
    its model writes on); the thread starts with the first record.
    """

    def __init__(self, target: Callable[[], tuple[eventlog.EventLog, str]], sample: float = 1.0,
                 flush_s: float = 0.5, max_pending: int = 100_000):
        self.target, self.sample, self.flush_s = target, float(sample), float(flush_s)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.written = self.dropped = self.failed_flushes = 0
        self._retry: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None

    def record(self, response: Mapping[str, Any], request_id: str) -> bool:
        """Queue one response (True) unless it falls outside the sample or the queue is full."""
        if self.sample <= 0 or (self.sample < 1 and random.random() >= self.sample):
            return False
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)
                    self._thread.start()
        rec = {"request_id": request_id, S.USER_ID: response[S.USER_ID], "model_version": response.get("model_version"),
               "collection": response.get("index_collection"), "strategy": response["strategy"],
               "k": response.get("k"), "items": response.get("items") or [],
               "latency_ms": (response.get("timing_ms") or {}).get("total"), "logged_us": eventlog.now_us()}
        try:
            self._queue.put_nowait(rec)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def flush(self) -> int:
        """Write everything queued now; returns the records written."""
        with self._lock:
            batch = self._retry
            self._retry = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                return 0
            try:
                store, dataset = self.target()
                n = store.append_served(dataset, batch)
            except Exception as exc:  # noqa: BLE001 - keep serving; try again on the next flush
                self.failed_flushes += 1
                self._retry = batch[-self._queue.maxsize:]
                log.warning("served log: %d record(s) not written yet: %s", len(batch), exc)
                return 0
            self.written += n
            return n

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self.flush()
