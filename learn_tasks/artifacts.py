"""Artifacts on an object store, for a LEARN_HOME that is a URL (``s3://bucket/prefix``, ``gs://``, ``memory://``).

With a URL home every stage still works on local files, in the working directory ``cfg.paths.home``
(``storage.cache_dir``): SQLite, Milvus Lite, the Feast repo and the datasets stay there. The artifacts
that hosts share are *published* to the URL under the same relative path and *fetched* into the working
directory when a host needs them. Object stores have no rename, so every artifact is committed by one
object written last, and readers see an artifact only through that object:

* a **folder** (a model run, an evaluation or a monitoring report): each file is uploaded under its
  SHA-256 (``<folder>/_objects/<sha256>``, never overwritten), then ``<folder>/_MANIFEST.json`` names
  every file with its size and hash. A folder without a manifest (an upload cut short) does not exist
  for readers; republishing replaces the manifest, and objects no manifest names any more are removed.
* a **log** (an embedding version, whose part files writers on several hosts add at once and which
  compaction rewrites): files are uploaded the same way, then one commit record per publish; see
  :mod:`learn_tasks.artifact_log`.
* a **file** (the ``CURRENT`` pointer of an embedding store, the monitoring history): one object,
  written whole (an object PUT is atomic).

A fetch checks each file's size and SHA-256 against the manifest or commit before it moves into place,
and builds a folder that is not here yet under a temporary name, so a local folder appears complete or
not at all, as with a local home. A fetched copy carries the manifest it matches (``_MANIFEST.json``),
so an unchanged artifact costs one small read.
Everything here is a no-op when LEARN_HOME is a local path: the embedded default is unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from learn_tasks.config import Settings, load_settings
from learn_tasks.storage import atomic_dir, exclusive, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"  # folder: the commit, written last (a local copy marks a fetched copy)
COMMITS = "_commits"  # log: one record per publish
OBJECTS = "_objects"  # file bytes under their SHA-256
SYNCED = "_SYNCED.json"  # local only: the log's files as last published or fetched here
INDEX = "_INDEX.json"  # local only: manifests of a parent's published children, by listing token
CONTROL = frozenset({MANIFEST, COMMITS, OBJECTS, SYNCED, INDEX})
FORMAT = 1
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact cannot be published or fetched (names the object and why)."""


@dataclass(frozen=True)
class Remote:
    """The file system of a URL home, its root path there, and the local working directory."""

    fs: Any
    root: str
    url: str
    local: Path

    def rel(self, path: str | Path) -> str:
        path = Path(path)
        for base in (self.local, self.local.resolve()):
            for p in (path, path.absolute()):
                try:
                    return p.relative_to(base).as_posix()
                except ValueError:
                    pass
        raise ArtifactError(f"{path} is not under the working directory {self.local} of LEARN_HOME={self.url}")

    def key(self, path: str | Path) -> str:
        return f"{self.root}/{self.rel(path)}"

    def url_of(self, path: str | Path) -> str:
        return f"{self.url}/{self.rel(path)}"


_REMOTES: dict[tuple, Remote] = {}
_REMOTES_LOCK = threading.Lock()


def remote(cfg: Settings) -> Remote | None:
    """The object store of a URL home (one file system object per process), None for a local home."""
    url = cfg.remote_home
    if url is None:
        return None
    options = dict(cfg.storage.options)
    if cfg.storage.endpoint_url and url.split("://", 1)[0] in ("s3", "s3a"):
        options.setdefault("endpoint_url", cfg.storage.endpoint_url)
    local = cfg.paths.home
    key = (os.getpid(), url, str(local), json.dumps(options, sort_keys=True, default=str))
    with _REMOTES_LOCK:
        hit = _REMOTES.get(key)
        if hit is None:
            import fsspec  # only a URL home needs it (and s3fs / gcsfs behind it)

            try:
                fs, root = fsspec.core.url_to_fs(url, **options)
            except (ImportError, ValueError) as exc:
                raise ArtifactError(f"LEARN_HOME={url}: no file system for this URL ({exc})") from exc
            hit = _REMOTES[key] = Remote(fs, root.rstrip("/"), url, local)
    return hit


def is_remote(cfg: Settings) -> bool:
    return cfg.remote_home is not None


def location(cfg: Settings, path: str | Path) -> str:
    """Where an artifact lives for every host: its URL under a URL home, else the local path."""
    r = remote(cfg)
    return r.url_of(path) if r is not None else str(path)


# ==================================================================================================
# Small pieces
# ==================================================================================================
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def file_entry(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def local_files(folder: Path) -> dict[str, Path]:
    """Files of a folder by relative name, leaving out control files and temporary or hidden ones."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] in CONTROL or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out[rel.as_posix()] = p
    return out


def get_json(r: Remote, key: str) -> Any | None:
    try:
        data = r.fs.cat_file(key)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{r.url}: {key} is not valid JSON ({exc})") from exc


def put_json(r: Remote, key: str, obj: Any) -> None:
    r.fs.pipe_file(key, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def _object_key(base: str, entry: dict[str, Any]) -> str:
    return f"{base}/{OBJECTS}/{entry['sha256']}"


def upload(r: Remote, base: str, path: Path, entry: dict[str, Any], known: set[str]) -> None:
    """Upload a file under its hash unless that object is known (or found) to be there already."""
    key = _object_key(base, entry)
    if entry["sha256"] in known:
        return
    try:
        if r.fs.info(key).get("size") == entry["size"]:
            return
    except FileNotFoundError:
        pass
    r.fs.put_file(str(path), key)


def download(r: Remote, base: str, name: str, entry: dict[str, Any], dest: Path) -> None:
    """Fetch one file into ``dest`` through a temporary name, checking its size and hash first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-fetch-{dest.name}-", dir=dest.parent)
    os.close(fd)
    try:
        r.fs.get_file(_object_key(base, entry), tmp)
        got = file_entry(Path(tmp))
        if got != {"size": entry["size"], "sha256": entry["sha256"]}:
            raise ArtifactError(f"{r.url}: {base}/{name} arrived with size {got['size']} and sha256 "
                                f"{got['sha256'][:12]}..., its manifest says {entry['size']} and "
                                f"{entry['sha256'][:12]}...")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _token(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten, from a listing (ETag on S3, generation on GCS, else times)."""
    for k in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(k):
            return str(info[k])
    stamp = next((info[k] for k in ("LastModified", "mtime", "updated", "created") if info.get(k)), "")
    return f"{info.get('size')}:{stamp}"


@contextmanager
def locked(cfg: Settings, r: Remote, folder: Path) -> Iterator[None]:
    """One fetch or publish of a folder at a time on this host (processes share the working directory)."""
    digest = hashlib.sha1(r.rel(folder).encode("utf-8")).hexdigest()[:20]
    with exclusive(cfg.paths.locks() / "artifacts" / f"{digest}.lock"):
        yield


def retry(what: str, fn, attempts: int = 3):
    """Run ``fn`` again after a missing or mismatched object (replaced under us by a newer publish)."""
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, ArtifactError) as exc:
            if attempt == attempts - 1:
                raise ArtifactError(f"{what}: {exc}") from exc
            log.info("%s: %s; reading the manifest again", what, exc)
            time.sleep(0.2 * (attempt + 1))


# ==================================================================================================
# Folders: files under their hash, then the manifest
# ==================================================================================================
def publish(cfg: Settings, folder: str | Path, meta: dict[str, Any] | None = None,
            keep_published: bool = False) -> dict[str, Any] | None:
    """Publish a complete local folder; returns its manifest (None for a local home).

    Idempotent: objects already there are not uploaded again, and an unchanged folder writes nothing.
    ``meta`` (small, JSON) rides in the manifest so listings need not read the folder's files. With
    ``keep_published``, published files missing here stay in the folder (a folder that only gains files,
    such as a model run another host added a file to); otherwise the folder is replaced whole.
    """
    r = remote(cfg)
    if r is None:
        return None
    folder = Path(folder)
    files = local_files(folder)
    if not files:
        raise ArtifactError(f"{folder}: no files to publish")
    entries = {name: file_entry(path) for name, path in files.items()}
    base = r.key(folder)
    with locked(cfg, r, folder):
        old = get_json(r, f"{base}/{MANIFEST}") or {}
        if keep_published:
            entries = {**(old.get("files") or {}), **entries}
        if old.get("files") == entries and old.get("meta") == (meta or {}):
            write_json(old, folder / MANIFEST)
            return old
        known = {e["sha256"] for e in (old.get("files") or {}).values()}
        for name, entry in entries.items():
            if name in files:
                upload(r, base, files[name], entry, known)
        manifest = {"format": FORMAT, "files": entries, "meta": meta or {}, "published": now_iso(),
                    "host": socket.gethostname()}
        put_json(r, f"{base}/{MANIFEST}", manifest)  # the commit
        write_json(manifest, folder / MANIFEST)
        _drop_objects(r, base, {e["sha256"] for e in (old.get("files") or {}).values()} - {
            e["sha256"] for e in entries.values()})
    log.info("published %s (%d files)", r.url_of(folder), len(entries))
    return manifest


def _drop_objects(r: Remote, base: str, hashes: set[str]) -> None:
    for h in sorted(hashes):
        try:
            r.fs.rm_file(f"{base}/{OBJECTS}/{h}")
        except FileNotFoundError:
            pass


def fetch(cfg: Settings, folder: str | Path, manifest: dict[str, Any] | None = None) -> bool | None:
    """Make the local folder a copy of the published one; False when none is published (None: local home).

    An up-to-date copy costs one read of the manifest (none when ``manifest`` is given, from a listing).
    """
    r = remote(cfg)
    if r is None:
        return None
    folder = Path(folder)
    base = r.key(folder)

    def attempt(m: dict[str, Any] | None) -> bool:
        m = m if m is not None else get_json(r, f"{base}/{MANIFEST}")
        if m is None:
            return False
        if _up_to_date(folder, m):
            return True
        with locked(cfg, r, folder):
            if not _up_to_date(folder, m):
                _fetch_folder(r, base, folder, m)
        return True

    first = [manifest]
    return retry(f"fetching {r.url_of(folder)}", lambda: attempt(first.pop() if first else None))


def _up_to_date(folder: Path, manifest: dict[str, Any]) -> bool:
    mine = folder / MANIFEST
    if not mine.exists():
        return False
    try:
        local = read_json(mine)
    except (OSError, ValueError):
        return False
    files = manifest.get("files") or {}
    return local.get("files") == files and all((folder / n).is_file() for n in files)


def _fetch_folder(r: Remote, base: str, folder: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files") or {}
    if not folder.exists():  # a new copy appears whole, as a locally written folder does
        with atomic_dir(folder) as tmp:
            for name, entry in files.items():
                download(r, base, name, entry, tmp / name)
            write_json(manifest, tmp / MANIFEST)
        return
    have: dict[str, Any] = {}
    if (folder / MANIFEST).exists():
        try:
            have = read_json(folder / MANIFEST).get("files") or {}
        except (OSError, ValueError):
            have = {}
    for name, entry in files.items():
        path = folder / name
        if have.get(name) == entry and path.is_file() and path.stat().st_size == entry["size"]:
            continue
        if path.is_file() and file_entry(path) == {"size": entry["size"], "sha256": entry["sha256"]}:
            continue
        download(r, base, name, entry, path)
    for name, path in local_files(folder).items():
        if name not in files:
            path.unlink()
    write_json(manifest, folder / MANIFEST)


def published(cfg: Settings, parent: str | Path) -> dict[str, dict[str, Any]]:
    """The manifest of every published child folder of ``parent`` (one listing; manifests already read
    here are not read again). Empty for a local home."""
    r = remote(cfg)
    if r is None:
        return {}
    parent = Path(parent)
    base = r.key(parent)
    r.fs.invalidate_cache(base)  # another host may have published since the last listing
    try:
        listing = r.fs.find(base, detail=True)
    except FileNotFoundError:
        listing = {}
    tokens: dict[str, str] = {}
    for key, info in listing.items():
        parts = key[len(base):].strip("/").split("/") if key.startswith(base) else []
        if len(parts) == 2 and parts[1] == MANIFEST and not parts[0].startswith("."):
            tokens[parts[0]] = _token(info)
    index_path = parent / INDEX
    try:
        index = read_json(index_path) if index_path.exists() else {}
    except (OSError, ValueError):
        index = {}
    out, changed = {}, False
    for name, token in sorted(tokens.items()):
        hit = index.get(name)
        if hit and hit.get("token") == token:
            out[name] = hit["manifest"]
            continue
        m = get_json(r, f"{base}/{name}/{MANIFEST}")
        if m is None:  # removed since the listing
            continue
        out[name], changed = m, True
        index[name] = {"token": token, "manifest": m}
    stale = set(index) - set(tokens)
    if changed or stale:
        write_json({k: v for k, v in index.items() if k in tokens}, index_path)
    return out


def fetch_children(cfg: Settings, parent: str | Path) -> list[Path]:
    """Fetch every published child folder of ``parent`` that is missing or stale here; returns them all."""
    parent = Path(parent)
    out = []
    for name, manifest in published(cfg, parent).items():
        try:
            if fetch(cfg, parent / name, manifest):
                out.append(parent / name)
        except ArtifactError as exc:  # one unreadable artifact does not hide the others
            log.warning("skipping %s: %s", parent / name, exc)
    return out


# ==================================================================================================
# Single files
# ==================================================================================================
def publish_file(cfg: Settings, path: str | Path) -> None:
    """Upload one local file as one object (replaced whole); nothing for a local home."""
    r = remote(cfg)
    if r is not None:
        r.fs.put_file(str(path), r.key(path))


def read_text(cfg: Settings, path: str | Path) -> str | None:
    """The published text of one file (None when there is none); for a local home, the local file's."""
    r = remote(cfg)
    if r is None:
        p = Path(path)
        return p.read_text(encoding="utf-8") if p.exists() else None
    try:
        return r.fs.cat_file(r.key(path)).decode("utf-8")
    except FileNotFoundError:
        return None


def fetch_file(cfg: Settings, path: str | Path) -> bool | None:
    """Copy one published file over the local one; False when none is published (None: local home)."""
    r = remote(cfg)
    if r is None:
        return None
    path = Path(path)
    try:
        data = r.fs.cat_file(r.key(path))
    except FileNotFoundError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return True


# ==================================================================================================
# python -m learn_tasks.artifacts check [--create-bucket]
# ==================================================================================================
def check(cfg: Settings, create_bucket: bool = False) -> dict[str, Any]:
    """Write, read and remove a probe object under the home URL (first creating an S3 bucket that is
    missing when asked); raises ArtifactError naming what failed."""
    r = remote(cfg)
    if r is None:
        return {"home": str(cfg.paths.home), "remote": None}
    bucket = r.root.strip("/").split("/", 1)[0]
    probe = f"{r.root}/.learn-probe-{uuid.uuid4().hex[:12]}"
    try:
        if create_bucket and not r.fs.exists(bucket):
            r.fs.mkdir(bucket)
            log.info("created bucket %s", bucket)
        r.fs.pipe_file(probe, b"ok")
        if r.fs.cat_file(probe) != b"ok":
            raise ArtifactError(f"{r.url}: the probe object read back different bytes")
        r.fs.rm_file(probe)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client error (connection, credentials, bucket) is the answer
        raise ArtifactError(f"LEARN_HOME={r.url}: cannot write, read and remove an object there "
                            f"({type(exc).__name__}: {exc})") from exc
    return {"home": r.url, "remote": type(r.fs).__name__, "working_directory": str(r.local)}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learn_tasks.artifacts",
                                     description="Check that LEARN_HOME's object store can be written.")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("--create-bucket", action="store_true", help="create the S3 bucket when it is missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(json.dumps(check(load_settings(), create_bucket=args.create_bucket), indent=2))
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
