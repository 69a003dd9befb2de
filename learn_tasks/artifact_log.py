"""Logs on the object store: folders that writers on several hosts add files to at once.

An embedding version (:mod:`learn_tasks.ceg.store`) is a log of part files: encode shards on different
hosts commit parts to it concurrently, and compaction rewrites or removes parts. Under a URL home
(:mod:`learn_tasks.artifacts`) each publish uploads the files that changed here under their SHA-256
(``<folder>/_objects/<sha256>``), then writes one commit record last
(``<folder>/_commits/<time>-<host>-<id>.json``: files added or changed, files removed). The folder is its
records replayed in name order. Publishers never overwrite one another's records, so concurrent shards
all land; a record is the commit, so an upload cut short adds nothing. Once a log has more than
``SNAPSHOT_AFTER`` records its next publisher folds them into one snapshot record.

Here, ``_SYNCED.json`` in the local folder records each file as last published or fetched (size, hash,
modification time): a publish sends only what changed since, and a fetch keeps what this host wrote and
has not published yet. Every function is a no-op for a local home.
"""
from __future__ import annotations

import logging
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from learn_tasks.artifacts import (COMMITS, FORMAT, OBJECTS, SYNCED, ArtifactError, Remote, download, file_entry,
                                   get_json, local_files, locked, now_iso, put_json, remote, retry, upload)
from learn_tasks.config import Settings
from learn_tasks.storage import read_json, write_json

log = logging.getLogger(__name__)

SNAPSHOT_AFTER = 64  # a log with more commit records than this is folded into a snapshot by its next publisher
GARBAGE_AFTER_S = 86400.0  # an object no file names is removed (at a snapshot) once it is this old


def _synced(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / SYNCED
    try:
        return read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _unchanged(path: Path, synced: dict[str, Any] | None) -> bool:
    """The local file is the one last published or fetched here (same size and modification time)."""
    if synced is None or not path.is_file():
        return False
    st = path.stat()
    return st.st_size == synced["size"] and st.st_mtime_ns == synced.get("mtime_ns")


def _commit_names(r: Remote, base: str) -> list[str]:
    r.fs.invalidate_cache(base)  # another host may have committed since the last listing
    try:
        return sorted(k.rsplit("/", 1)[-1] for k in r.fs.find(base) if k.endswith(".json"))
    except FileNotFoundError:
        return []


def _apply(state: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    for gone in record.get("remove", []):
        state.pop(gone, None)
    state.update(record.get("add", {}))


def log_state(cfg: Settings, folder: str | Path) -> dict[str, dict[str, Any]] | None:
    """The published files of a log folder (its commits replayed), None when it has no commit.

    A snapshot record (written once a log has many records) holds the state of the records it covers,
    which are then removed; a record the snapshot did not see (committed meanwhile) is applied after it.
    """
    r = remote(cfg)
    if r is None:
        return None
    folder = Path(folder)
    base = f"{r.key(folder)}/{COMMITS}"
    names = _commit_names(r, base)
    if not names:
        return None
    cache = folder / COMMITS
    for old in set(p.name for p in cache.glob("*.json")) - set(names) if cache.is_dir() else ():
        (cache / old).unlink(missing_ok=True)  # covered by a snapshot
    state: dict[str, dict[str, Any]] = {}
    seen: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        path = cache / name
        if path.exists():
            record = read_json(path)
        else:
            record = get_json(r, f"{base}/{name}")
            if record is None:
                raise ArtifactError(f"{r.url}: commit {base}/{name} vanished")
            write_json(record, path)  # commit records never change: cached for good
        if record.get("snapshot"):
            covered = set(record.get("covers", []))
            state = dict(record.get("state", {}))
            seen = [(n, rec) for n, rec in seen if n not in covered]
            for _, rec in seen:
                _apply(state, rec)
        else:
            _apply(state, record)
            seen.append((name, record))
    return state


def _snapshot(cfg: Settings, r: Remote, folder: Path, base: str) -> None:
    """Fold a long log into one snapshot record, then remove the records it covers (readers that listed
    them before retry; see :func:`log_state`)."""
    names = _commit_names(r, f"{base}/{COMMITS}")
    if len(names) <= SNAPSHOT_AFTER:
        return
    state = log_state(cfg, folder) or {}
    name = f"{time.time_ns():020d}-{socket.gethostname()[:32]}-{uuid.uuid4().hex[:8]}.json"
    put_json(r, f"{base}/{COMMITS}/{name}", {"format": FORMAT, "snapshot": True, "state": state,
                                                  "covers": names, "at": now_iso(), "host": socket.gethostname()})
    for old in names:
        try:
            r.fs.rm_file(f"{base}/{COMMITS}/{old}")
        except FileNotFoundError:
            pass
    # Objects no file of the log names any more (parts compaction replaced). Only old ones: an object
    # uploaded by a publish still in flight is not named by any record yet.
    live = {e["sha256"] for e in state.values()}
    dropped = 0
    try:
        objects = r.fs.find(f"{base}/{OBJECTS}", detail=True)
    except FileNotFoundError:
        objects = {}
    for key, info in objects.items():
        age = _age_s(info)
        if key.rsplit("/", 1)[-1] not in live and age is not None and age > GARBAGE_AFTER_S:
            r.fs.rm_file(key)
            dropped += 1
    log.info("folded %d commit records of %s into one snapshot; removed %d unused object(s)", len(names),
             r.url_of(folder), dropped)


def _age_s(info: dict[str, Any]) -> float | None:
    """Seconds since an object was written, from a listing (None when the store does not say)."""
    for k in ("LastModified", "mtime", "updated", "created"):
        v = info.get(k)
        if isinstance(v, datetime):
            return (datetime.now(timezone.utc) - (v if v.tzinfo else v.replace(tzinfo=timezone.utc))).total_seconds()
        if isinstance(v, (int, float)):
            return time.time() - float(v)
    return None


def publish_log(cfg: Settings, folder: str | Path) -> dict[str, Any] | None:
    """Publish what changed in a log folder since it was last published or fetched here: one commit
    record (files added or changed, files removed). None when nothing changed (or a local home)."""
    r = remote(cfg)
    if r is None:
        return None
    folder = Path(folder)
    base = r.key(folder)
    with locked(cfg, r, folder):
        synced = _synced(folder)
        files = local_files(folder)
        add, now_synced = {}, {}
        for name, path in files.items():
            prev = synced.get(name)
            if _unchanged(path, prev):
                now_synced[name] = prev
                continue
            entry = file_entry(path)
            if prev is None or prev["sha256"] != entry["sha256"]:
                add[name] = entry
            now_synced[name] = {**entry, "mtime_ns": path.stat().st_mtime_ns}
        remove = sorted(n for n in synced if n not in files)
        if not add and not remove:
            write_json(now_synced, folder / SYNCED)
            return None
        for name, entry in add.items():
            upload(r, base, files[name], entry, set())
        record = {"format": FORMAT, "add": add, "remove": remove, "at": now_iso(), "host": socket.gethostname()}
        name = f"{time.time_ns():020d}-{socket.gethostname()[:32]}-{uuid.uuid4().hex[:8]}.json"
        put_json(r, f"{base}/{COMMITS}/{name}", record)  # the commit
        write_json(record, folder / COMMITS / name)
        write_json(now_synced, folder / SYNCED)
        _snapshot(cfg, r, folder, base)
    log.info("published %s: %d file(s) added or changed, %d removed", r.url_of(folder), len(add), len(remove))
    return record


def fetch_log(cfg: Settings, folder: str | Path, last: tuple[str, ...] = ()) -> bool | None:
    """Bring a log folder up to its published state; False when nothing is published (None: local home).

    Files written here and not yet published are kept (their writer publishes them); a file removed by
    a later commit is removed here unless it changed here since. Files named in ``last`` are fetched
    after the others (a marker that readers look for, such as an embedding version's manifest).
    """
    r = remote(cfg)
    if r is None:
        return None
    folder = Path(folder)
    base = r.key(folder)

    def attempt() -> bool:
        state = log_state(cfg, folder)
        if state is None:
            return False
        with locked(cfg, r, folder):
            synced = _synced(folder)
            new_synced = {}
            for name, entry in sorted(state.items(), key=lambda kv: kv[0] in last):
                path, prev = folder / name, synced.get(name)
                if path.is_file() and prev is not None and not _unchanged(path, prev):
                    new_synced[name] = prev  # changed here since the last sync: this host publishes it
                    continue
                if path.is_file() and prev is not None and prev["sha256"] == entry["sha256"]:
                    new_synced[name] = prev
                    continue
                if path.is_file() and prev is None:
                    mine = file_entry(path)
                    if mine["sha256"] == entry["sha256"]:
                        new_synced[name] = {**mine, "mtime_ns": path.stat().st_mtime_ns}
                    continue  # else written here and not yet published: kept
                download(r, base, name, entry, path)
                new_synced[name] = {**entry, "mtime_ns": path.stat().st_mtime_ns}
            for name, prev in synced.items():
                path = folder / name
                if name not in state and _unchanged(path, prev):
                    path.unlink()  # removed by a later commit (compaction on another host)
            write_json(new_synced, folder / SYNCED)
        return True

    return retry(f"fetching {r.url_of(folder)}", attempt)
