"""CEG entry point: encode a dataset's catalogue into the embedding store, or a few items for serving.

:func:`encode_catalogue` (``learn encode``) encodes only items whose current content hash differs
from their stored one (a second run encodes nothing; a changed title re-encodes that item), commits a
part every ``encode.shard_items`` items (a killed run resumes from the last committed part), and with
``shard=(i, n)`` takes a stable, disjoint slice of the catalogue so workers can split the work. The
version becomes CURRENT once every encodable catalogue item has an up-to-date row.

Under a URL home (:mod:`learn_tasks.artifacts`) a run starts from the published version, publishes its
parts when it has encoded them, and fetches again before judging completeness, so shards on different
hosts see each other's parts and the last to finish makes the version CURRENT.

Bad input never stops a run and never disappears (see :mod:`learn_tasks.ceg.text`): quarantined
items are recorded in the version's ``quarantine.parquet``, repairs and truncations are counted, and
``encoded + skipped + quarantined == total`` holds for every run.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.ceg import store
from learn_tasks.ceg.encoder import Encoder, load_encoder
from learn_tasks.ceg.text import ACTION, QUARANTINED, REPAIRED, prepare_items
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.storage import read_json, write_json, write_parquet

log = logging.getLogger(__name__)


def encode_items(items: pd.DataFrame, cfg: Settings, encoder: Encoder | None = None) -> np.ndarray:
    """Embeddings of ``items`` rows (in their order) with the configured encoder; nothing is stored.

    For the online service: a new item is rendered and encoded exactly as ``learn encode`` would.
    Raises ``ValueError`` naming the rows that have no text to encode.
    """
    encoder = encoder or load_encoder(cfg)
    prep = prepare_items(items, cfg.encode.template, source="items", dedupe=False)
    bad = prep.quarantine[prep.quarantine[ACTION] == QUARANTINED]
    if len(bad):
        first = bad.iloc[0]
        raise ValueError(f"{len(bad)} item(s) cannot be encoded; first: row {first[S.QUARANTINE_LINE]}, "
                         f"item_id {first[S.ITEM_ID]}: {first[S.QUARANTINE_REASON]}")
    return encoder.encode_texts([t for t in prep.texts if t is not None])


def encode_catalogue(
    cfg: Settings,
    dataset: str,
    limit: int | None = None,
    shard: tuple[int, int] | str | None = None,
    model: str | None = None,
    on_commit: Callable[[Path, int], None] | None = None,
) -> dict[str, Any]:
    """Encode the dataset's items that have no up-to-date embedding in this encoder's version.

    ``limit`` keeps the first N catalogue rows (by item id); ``shard=(i, n)`` keeps the rows whose
    item id falls in shard i of n. ``on_commit(part_path, items_committed)`` is called after each part
    is committed (progress reporting). Returns counts with ``encoded + skipped + quarantined == total``.
    """
    t0 = time.perf_counter()
    if model:
        cfg = cfg.with_overrides(encode={"model": model})
    ecfg = cfg.encode
    shard_t = store.parse_shard(shard)
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    items = data.load_items(cfg, dataset)
    source = str(data.dataset_dir(cfg, dataset) / "items.parquet")
    prep = prepare_items(items, ecfg.template, source=source)
    encoder = load_encoder(cfg)
    fp = encoder.fingerprint
    vdir = store.store_dir(cfg, dataset, fp)
    vdir.mkdir(parents=True, exist_ok=True)
    store.clean_stale_tmp(vdir)
    store.fetch_version(cfg, dataset, fp)  # a URL home: start from what every host has published
    manifest_path = vdir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {
        **encoder.describe(), "dataset": dataset, "created": _now()}
    described = _described(manifest)
    write_json(manifest, manifest_path)  # the version describes itself before its first part lands
    # The quarantine is a pure function of catalogue + template: every run (and shard) writes the same file.
    write_parquet(prep.quarantine, vdir / "quarantine.parquet")

    n = len(items)
    in_slice = np.ones(n, dtype=bool)
    if limit is not None:
        in_slice[limit:] = False
    if shard_t is not None:
        in_slice &= store.shard_of(prep.item_ids, shard_t[1]) == shard_t[0]
    total = int(in_slice.sum())
    quarantined = int((in_slice & ~prep.ok).sum())
    repaired = int(prep.quarantine[ACTION].eq(REPAIRED).to_numpy()[
        np.isin(prep.quarantine[S.QUARANTINE_LINE].to_numpy() - 1, np.flatnonzero(in_slice))].sum())

    # Up to date = the item's newest stored row has the item's current content hash.
    eff = store.effective_keys(vdir)
    stored = dict(zip(eff[S.ITEM_ID].to_numpy().tolist(), eff[S.CONTENT_HASH].tolist()))
    todo = [i for i in np.flatnonzero(in_slice & prep.ok) if stored.get(int(prep.item_ids[i])) != prep.hashes[i]]
    skipped = total - quarantined - len(todo)

    tag = "all" if shard_t is None else f"s{shard_t[0]}of{shard_t[1]}"
    encoded = truncated = parts_written = 0
    window = max(ecfg.shard_items * 16, 1)
    t_enc = time.perf_counter()
    for w in range(0, len(todo), window):
        rows = np.asarray(todo[w:w + window])
        ids, trunc = encoder.tokenize([prep.texts[i] for i in rows])
        truncated += int(trunc.sum())
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # similar lengths share a part: little padding
        for c in range(0, len(order), ecfg.shard_items):
            chunk = order[c:c + ecfg.shard_items]
            emb = encoder.encode_ids([ids[k] for k in chunk])
            part = store.write_part(vdir, prep.item_ids[rows[chunk]], [prep.hashes[i] for i in rows[chunk]], emb, tag)
            encoded += len(chunk)
            parts_written += 1
            rate = encoded / max(time.perf_counter() - t_enc, 1e-9)
            log.info("encode %s: part %s (%d/%d items, %.0f items/s)", dataset, part.name, encoded, len(todo), rate)
            if on_commit is not None:
                on_commit(part, encoded)
    seconds_encoding = time.perf_counter() - t_enc
    if parts_written:  # a URL home: publish this run's parts, then see the other shards'
        store.publish_version(cfg, dataset, fp)
        store.fetch_version(cfg, dataset, fp)

    # Complete = every encodable catalogue item has an up-to-date row. The last shard to finish sees it.
    live = pd.DataFrame({S.ITEM_ID: prep.item_ids[prep.ok], S.CONTENT_HASH: [h for h in prep.hashes if h]})
    eff = store.effective_keys(vdir)
    merged = live.merge(eff[[S.ITEM_ID, S.CONTENT_HASH]], on=[S.ITEM_ID, S.CONTENT_HASH], how="left", indicator=True)
    missing = int((merged["_merge"] == "left_only").sum())
    complete = missing == 0
    compacted = 0
    if limit is None and shard_t is None and complete and len(eff) and int(eff["n_rows"].iloc[0]) > len(live):
        compacted = store.compact(vdir, live)  # full view of the catalogue: safe to drop stale rows
    is_current = complete or store.current_fingerprint(cfg, dataset) == fp
    seconds = time.perf_counter() - t0
    result = {
        "dataset": dataset, "fingerprint": fp, "model": ecfg.model, "dim": encoder.dim,
        "total": total, "encoded": encoded, "skipped": skipped, "quarantined": quarantined,
        "repaired": repaired, "truncated": truncated, "parts_written": parts_written,
        "shard": None if shard_t is None else f"{shard_t[0]}/{shard_t[1]}", "limit": limit,
        "catalogue_items": n, "missing": missing, "complete": complete, "current": is_current,
        "compacted_rows": compacted, "store": str(vdir),
        "seconds": round(seconds, 3), "items_per_s": round(encoded / seconds_encoding, 1) if encoded else None,
    }
    manifest.update({
        "updated": _now(), "parts": len(store.list_parts(vdir)), "items": int(len(live) - missing),
        "catalogue_items": n, "quarantined": int((~prep.ok).sum()), "complete": complete, "last_run": result,
    })
    write_json(manifest, manifest_path)
    if parts_written or compacted or _described(manifest) != described:  # a run that changed nothing publishes nothing
        store.publish_version(cfg, dataset, fp)
    if complete:  # after the version (a URL home publishes the version, then the pointer)
        store.set_current_fingerprint(cfg, dataset, fp)
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _described(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a version's manifest says about the version (not when or how the last run went)."""
    return {k: v for k, v in manifest.items() if k not in ("updated", "last_run")}
