"""CEG store: content embeddings on disk, one version per encoder fingerprint.

``cfg.paths.embedding_store(dataset)/<fingerprint>/part-*.parquet`` (item_id, content_hash,
embedding) + ``manifest.json`` + ``quarantine.parquet``; ``CURRENT`` beside the versions names the
fingerprint of the last complete one. Content embeddings are computed once per (item text, encoder)
and reused by training, evaluation, indexing and serving. Parts are written atomically and form a log:
for each item the row in the newest part wins, so a killed run loses at most its uncommitted part.
:func:`compact` rewrites parts holding superseded rows once a run has seen the whole catalogue.

``CURRENT`` is read only by :func:`current_fingerprint` and written only by
:func:`set_current_fingerprint`. :func:`shard_of` gives every item id a stable shard, so encoding
workers can split a catalogue into disjoint slices.

When LEARN_HOME is a URL (:mod:`learn_tasks.artifacts`), a version is a published log: each encode run
fetches it first (:func:`fetch_version`), publishes the parts it committed as one commit record
(:func:`publish_version`), and ``CURRENT`` is one object beside the versions, written after the version
it names was published. Readers fetch the version they load, so every host reads the same embeddings.
"""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from learn_tasks import artifact_log, artifacts
from learn_tasks import schema as S
from learn_tasks.ceg.text import QUARANTINE_COLUMNS
from learn_tasks.config import Settings
from learn_tasks.storage import atomic_path, read_json, write_text

_CURRENT = "CURRENT"  # file in the dataset's store naming the fingerprint of the last complete version
_MANIFEST = "manifest.json"  # a version's description, written before its first part
_STALE_TMP_S = 3600  # temp files older than this are leftovers of a killed run


# --------------------------------------------------------------------------------------------------
# Versions and the CURRENT pointer
# --------------------------------------------------------------------------------------------------
def store_dir(cfg: Settings, dataset: str, fingerprint: str) -> Path:
    """The folder of one embedding version (complete or not)."""
    return cfg.paths.embedding_store(dataset) / fingerprint


def current_fingerprint(cfg: Settings, dataset: str) -> str | None:
    """Fingerprint of the dataset's last complete embedding version, or None when there is none
    (under a URL home, the published pointer: what every host reads)."""
    path = cfg.paths.embedding_store(dataset) / _CURRENT
    if artifacts.is_remote(cfg):
        return (artifacts.read_text(cfg, path) or "").strip() or None
    if not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def set_current_fingerprint(cfg: Settings, dataset: str, fingerprint: str) -> None:
    """Point ``CURRENT`` at a complete version (atomic: readers see the old or the new name); under a URL
    home the pointer object is replaced too, so publish the version (:func:`publish_version`) first."""
    path = cfg.paths.embedding_store(dataset) / _CURRENT
    write_text(fingerprint + "\n", path)
    artifacts.publish_file(cfg, path)


def fetch_version(cfg: Settings, dataset: str, fingerprint: str) -> bool:
    """Under a URL home, bring the local copy of a version up to its published state (False when it was
    never published); with a local home there is nothing to fetch (True)."""
    got = artifact_log.fetch_log(cfg, store_dir(cfg, dataset, fingerprint), last=(_MANIFEST,))
    return True if got is None else got


def publish_version(cfg: Settings, dataset: str, fingerprint: str) -> None:
    """Under a URL home, publish the parts and files of a version that changed here (nothing otherwise)."""
    artifact_log.publish_log(cfg, store_dir(cfg, dataset, fingerprint))


def has_version(cfg: Settings, dataset: str, fingerprint: str) -> bool:
    """Whether the store has that embedding version (fetched here first under a URL home)."""
    return fetch_version(cfg, dataset, fingerprint) and (store_dir(cfg, dataset, fingerprint) / _MANIFEST).exists()


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def list_parts(vdir: Path) -> list[Path]:
    """Committed parts in commit order (names start with a nanosecond timestamp)."""
    return sorted(vdir.glob("part-*.parquet"))


def _new_part_name(tag: str) -> str:
    return f"part-{time.time_ns():020d}-{tag}-{uuid.uuid4().hex[:8]}.parquet"


def _write_table(path: Path, ids: np.ndarray, hashes: Sequence[str], emb: np.ndarray) -> None:
    """ids [N], hashes [N], emb [N, D] -> one Parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    table = pa.table({
        S.ITEM_ID: pa.array(np.asarray(ids, dtype=np.int64)),
        S.CONTENT_HASH: pa.array(list(hashes), pa.string()),
        S.EMBEDDING: pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(emb, np.float32).ravel())),
    })
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


def write_part(vdir: Path, ids: np.ndarray, hashes: Sequence[str], emb: np.ndarray, tag: str) -> Path:
    """Commit one part (``tag`` names the writer, e.g. ``all`` or ``s0of4``); returns its path."""
    path = vdir / _new_part_name(tag)
    _write_table(path, ids, hashes, emb)
    return path


def _read_part(path: Path, with_embeddings: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    import pyarrow.parquet as pq

    cols = [S.ITEM_ID, S.CONTENT_HASH] + ([S.EMBEDDING] if with_embeddings else [])
    table = pq.read_table(path, columns=cols)
    ids = table.column(S.ITEM_ID).to_numpy()
    hashes = np.asarray(table.column(S.CONTENT_HASH).to_pylist(), dtype=object)
    emb = None
    if with_embeddings:
        col = table.column(S.EMBEDDING).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        emb = flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)
    return ids, hashes, emb


def effective_keys(vdir: Path) -> pd.DataFrame:
    """item_id -> (content_hash, part, row) of the newest row per item (the store's current state).

    ``n_rows`` (the same on every row) counts all stored rows, superseded ones included.
    """
    frames = []
    for k, part in enumerate(list_parts(vdir)):
        ids, hashes, _ = _read_part(part, with_embeddings=False)
        frames.append(pd.DataFrame({S.ITEM_ID: ids, S.CONTENT_HASH: hashes, "part": k, "row": np.arange(len(ids))}))
    if not frames:
        return pd.DataFrame({S.ITEM_ID: pd.Series(dtype="int64"), S.CONTENT_HASH: pd.Series(dtype=object),
                             "part": pd.Series(dtype="int64"), "row": pd.Series(dtype="int64"),
                             "n_rows": pd.Series(dtype="int64")})
    allrows = pd.concat(frames, ignore_index=True)
    eff = allrows.drop_duplicates(S.ITEM_ID, keep="last").copy()
    eff["n_rows"] = len(allrows)
    return eff


# --------------------------------------------------------------------------------------------------
# Reading a version
# --------------------------------------------------------------------------------------------------
def load_embeddings(cfg: Settings, dataset: str, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids ascending int64 [N], embeddings float32 [N, D]) of a version (default: CURRENT)."""
    fingerprint = fingerprint or current_fingerprint(cfg, dataset)
    if fingerprint is None:
        raise FileNotFoundError(f"no complete content embeddings for dataset {dataset!r} under "
                                f"{cfg.paths.embedding_store(dataset)}; run `learn encode --dataset {dataset}`")
    vdir = store_dir(cfg, dataset, fingerprint)
    fetch_version(cfg, dataset, fingerprint)
    if not (vdir / _MANIFEST).exists():
        raise FileNotFoundError(f"embedding version {fingerprint!r} not found under "
                                f"{artifacts.location(cfg, vdir)}")
    ids_l, emb_l = [], []
    for part in list_parts(vdir):
        ids, _, emb = _read_part(part, with_embeddings=True)
        if len(ids):
            ids_l.append(ids)
            emb_l.append(emb)
    if not ids_l:
        dim = int(read_json(vdir / _MANIFEST).get("dim", 0))
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    ids = np.concatenate(ids_l)
    emb = np.concatenate(emb_l)
    # newest row per item wins: keep the last occurrence in commit order
    rev = ids[::-1]
    _, first_in_rev = np.unique(rev, return_index=True)  # unique sorts ascending
    keep = len(ids) - 1 - first_in_rev
    return ids[keep].astype(np.int64), np.ascontiguousarray(emb[keep], dtype=np.float32)


def load_quarantine(cfg: Settings, dataset: str, fingerprint: str | None = None) -> pd.DataFrame:
    """The quarantine records of a version (default: CURRENT); empty when there is none."""
    fingerprint = fingerprint or current_fingerprint(cfg, dataset)
    path = store_dir(cfg, dataset, fingerprint or "") / "quarantine.parquet"
    if fingerprint is not None:
        fetch_version(cfg, dataset, fingerprint)
    if fingerprint is None or not path.exists():
        return pd.DataFrame(columns=QUARANTINE_COLUMNS).astype(QUARANTINE_COLUMNS)
    return pd.read_parquet(path)


# --------------------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------------------
def compact(vdir: Path, live: pd.DataFrame) -> int:
    """Drop superseded rows and rows of items no longer in the catalogue; returns rows removed.

    Only parts holding such rows are rewritten (in place, atomically); afterwards every item has one row.
    """
    parts = list_parts(vdir)
    eff = effective_keys(vdir)
    if eff.empty:
        return 0
    eff = eff[eff[S.ITEM_ID].isin(live[S.ITEM_ID])]
    keep_by_part = {k: np.sort(g["row"].to_numpy()) for k, g in eff.groupby("part")}
    removed = 0
    for k, part in enumerate(parts):
        ids, hashes, emb = _read_part(part, with_embeddings=False)
        keep = keep_by_part.get(k, np.zeros(0, dtype=np.int64))
        if len(keep) == len(ids):
            continue
        removed += len(ids) - len(keep)
        if len(keep) == 0:
            part.unlink()
            continue
        ids, hashes, emb = _read_part(part, with_embeddings=True)
        _write_table(part, ids[keep], list(hashes[keep]), emb[keep])
    return removed


def clean_stale_tmp(vdir: Path) -> None:
    """Remove temp files a killed run left behind (older than an hour, so live writers are spared)."""
    now = time.time()
    for tmp in vdir.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------
def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i) -> (i, n)."""
    if text is None:
        return None
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shard must look like i/n with 0 <= i < n, got {text!r}")
        text = (int(m.group(1)), int(m.group(2)))
    i, n = int(text[0]), int(text[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n (0-based)")
    return i, n


def shard_of(item_ids: np.ndarray, n: int) -> np.ndarray:
    """Stable shard number per item id (splitmix64 mix, then mod n): balanced even for patterned ids,
    and an item never moves shard when others are added or removed."""
    x = np.asarray(item_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n)).astype(np.int64)
