"""The promotion gate's fixed validation sample, and the gate scores it caches.

The gate compares the candidate with the promoted model on validation cases. Drawing those cases from
the current split every run would make every run score the promoted model again: each increment moves a
few users' validation targets and adds items to the catalogue. Instead the sample is frozen:

* :func:`ensure_sample` draws ``users`` validation cases once (user, history, target, as item ids) and the
  catalogue they are ranked against, and keeps them under ``$LEARN_HOME/pipeline/_gate/<dataset>/``. A
  full run draws a new sample (once per run key, so re-running it keeps the same one); an incremental
  run reuses it while its protocol, size and seed match and its items are still in the catalogue.
* :func:`score` ranks the frozen catalogue for the frozen cases with a model and returns the gate's
  metrics (slice ``all``) and every case's rank; the score is cached under a key of everything it
  depends on (the model run, the sample's digest, the embedding version the model reads, the metric
  settings), so the promoted model, scored as a candidate in the run that promoted it, is not scored
  again.
* Each case's slices (cold-start and long-tail target, head, cold user) are frozen with it, from the
  training events known at validation time (:func:`slice_masks`): the gate compares the two models'
  ranks per slice, paired on the same cases (:mod:`learn_tasks.orchestration.gate`).

Both models are ranked by the same code over the same items, so the comparison stays fair; new items
and the newest events enter the sample at the next full run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from learn_tasks import schema as S
from learn_tasks.ceg import store
from learn_tasks.config import Settings
from learn_tasks.data import splits
from learn_tasks.evaluation.harness import (Cases, Scorer, build_cases, case_slices, check_scorer, known_events,
                                            make_scorer, rank_all, sample_cases)
from learn_tasks.evaluation.metrics import rank_metrics
from learn_tasks.pch.catalogue import Catalogue, catalogue_item_ids, item_popularity, tail_mask
from learn_tasks.state import exclusive
from learn_tasks.storage import read_json, write_json

log = logging.getLogger("learn.pipeline")

SAMPLE_FILE, META_FILE, SCORES_FILE = "sample.npz", "sample.json", "scores.json"
SCORE_FORMAT = 2  # cached scores carry every case's rank (format 1 had the metrics only)


@dataclass
class FixedSample:
    """Frozen validation cases in item-id space and the catalogue they are ranked against."""

    user_ids: np.ndarray
    hist_offsets: np.ndarray
    hist_items: np.ndarray
    target_items: np.ndarray
    train_events: np.ndarray
    catalogue: np.ndarray  # sorted item ids
    meta: dict[str, Any]
    # training events of each case's target known at validation time, and whether it is in the long tail
    # (None in a sample drawn before the gate compared slices: such a sample is drawn again)
    target_popularity: np.ndarray | None = None
    target_long_tail: np.ndarray | None = None

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    def __len__(self) -> int:
        return len(self.user_ids)


def sample_dir(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.gate_sample(dataset)


def _digest(arrays: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(dict(spec), sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        h.update(name.encode() + np.ascontiguousarray(arrays[name], np.int64).tobytes())
    return h.hexdigest()[:16]


def load_sample(cfg: Settings, dataset: str) -> FixedSample | None:
    folder = sample_dir(cfg, dataset)
    if not (folder / META_FILE).exists() or not (folder / SAMPLE_FILE).exists():
        return None
    meta = read_json(folder / META_FILE)
    with np.load(folder / SAMPLE_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    return FixedSample(meta=meta, **arrays)


def draw_sample(cfg: Settings, dataset: str, protocol: str, users: int, seed: int) -> FixedSample:
    """Validation cases of the current split (at most ``users``, 0 = all), frozen as item ids, with each
    target's training popularity and long-tail membership at validation time."""
    split = splits.load_split(cfg, dataset, protocol)
    ids = catalogue_item_ids(cfg, dataset, split)
    n = len(ids)
    cat = Catalogue(ids, None, np.zeros(n, np.int64), np.zeros(n, np.int64))
    cases = sample_cases(build_cases(split, cat, protocol, S.VALID), users, seed)
    known = item_popularity(known_events(split, S.VALID), ids)
    tail = tail_mask(known, cfg.evaluate.tail_share)
    arrays = {"user_ids": cases.user_ids.astype(np.int64), "hist_offsets": cases.hist_offsets.astype(np.int64),
              "hist_items": ids[cases.hist_rows], "target_items": ids[cases.target_rows],
              "train_events": cases.history_events.astype(np.int64), "catalogue": ids,
              "target_popularity": known[cases.target_rows].astype(np.int64),
              "target_long_tail": tail[cases.target_rows].astype(np.int64)}
    spec = {"dataset": dataset, "protocol": protocol, "users": int(users), "seed": int(seed),
            "tail_share": float(cfg.evaluate.tail_share)}
    meta = {**spec, "cases": len(cases), "items": n, "digest": _digest(arrays, spec),
            "created": datetime.now(timezone.utc).isoformat()}
    return FixedSample(meta=meta, **arrays)


def slice_masks(sample: FixedSample, cold_user_max_events: int) -> dict[str, np.ndarray]:
    """Boolean case masks of every slice (``harness.case_slices`` on the frozen per-case facts)."""
    if sample.target_popularity is None or sample.target_long_tail is None:
        raise ValueError(f"gate sample {sample.digest} has no per-case slice facts: draw it again")
    rows = np.arange(len(sample))
    cases = Cases(sample.user_ids, sample.hist_offsets, np.zeros(len(sample.hist_items), np.int64), rows)
    return case_slices(cases, np.asarray(sample.target_popularity), np.asarray(sample.target_long_tail, bool),
                       cold_user_max_events)


def _save(cfg: Settings, dataset: str, sample: FixedSample) -> None:
    folder = sample_dir(cfg, dataset)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{SAMPLE_FILE}"
    with open(tmp, "wb") as fh:
        np.savez(fh, user_ids=sample.user_ids, hist_offsets=sample.hist_offsets, hist_items=sample.hist_items,
                 target_items=sample.target_items, train_events=sample.train_events, catalogue=sample.catalogue,
                 target_popularity=sample.target_popularity, target_long_tail=sample.target_long_tail)
    tmp.replace(folder / SAMPLE_FILE)
    write_json(sample.meta, folder / META_FILE)  # written last: a sample without it is not used


def ensure_sample(cfg: Settings, dataset: str, protocol: str, users: int, seed: int,
                  redraw_for: str | None = None) -> FixedSample:
    """The dataset's gate sample, drawn when missing, when its spec changed, when catalogue items it ranks
    are gone, or once for ``redraw_for`` (a full run's key: a full run compares on its own data)."""
    with exclusive(cfg, sample_dir(cfg, dataset).parent / f".{dataset}.lock"):
        cur = load_sample(cfg, dataset)
        why = None
        if cur is None:
            why = "no gate sample yet"
        elif (cur.meta.get("protocol"), cur.meta.get("users"), cur.meta.get("seed")) != (protocol, int(users), int(seed)):
            why = "the gate sample's protocol, size or seed changed"
        elif cur.target_popularity is None or cur.meta.get("tail_share") != float(cfg.evaluate.tail_share):
            why = "the gate sample has no per-case slices for the current evaluate.tail_share"
        elif redraw_for is not None and cur.meta.get("drawn_for") != redraw_for:
            why = f"a full run ({redraw_for}) draws its own sample"
        else:
            items = catalogue_item_ids(cfg, dataset, splits.load_split(cfg, dataset, protocol))
            if not np.isin(cur.catalogue, items).all():
                why = "items of the gate sample left the catalogue"
        if why is None:
            return cur
        sample = draw_sample(cfg, dataset, protocol, users, seed)
        sample.meta["drawn_for"] = redraw_for
        sample.meta["why"] = why
        _save(cfg, dataset, sample)
        log.info("gate sample of %s: %d validation case(s) over %d items (%s)", dataset, len(sample),
                 len(sample.catalogue), why)
        return sample


def embedding_version(cfg: Settings, dataset: str, run_dir: Path) -> str | None:
    """The embedding version a trained run is scored with (its own while the store has it, as
    ``pch.catalogue.checkpoint_catalogue`` does)."""
    meta = run_dir / "meta.json"
    fp = read_json(meta).get("embedding_fingerprint") if meta.exists() else None
    if fp and store.has_version(cfg, dataset, fp):
        return fp
    return store.current_fingerprint(cfg, dataset)


def score_key(cfg: Settings, dataset: str, run_dir: Path, sample: FixedSample) -> str:
    """Everything a model's score on the sample depends on."""
    spec = {"run_dir": str(Path(run_dir).resolve()), "sample": sample.digest, "ks": list(cfg.evaluate.ks),
            "embeddings": embedding_version(cfg, dataset, Path(run_dir)), "format": SCORE_FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def cached_score(cfg: Settings, dataset: str, key: str) -> dict[str, Any] | None:
    path = sample_dir(cfg, dataset) / SCORES_FILE
    return (read_json(path).get(key) if path.exists() else None)


def _remember(cfg: Settings, dataset: str, key: str, value: Mapping[str, Any], keep: int = 20) -> None:
    path = sample_dir(cfg, dataset) / SCORES_FILE
    with exclusive(cfg, sample_dir(cfg, dataset).parent / f".{dataset}.scores.lock"):
        scores = read_json(path) if path.exists() else {}
        scores.pop(key, None)
        scores[key] = dict(value)
        write_json(dict(list(scores.items())[-keep:]), path)  # the newest few models


def score(cfg: Settings, dataset: str, protocol: str, kind: str, run_dir: str | Path, sample: FixedSample,
          use_cache: bool = True, scorer: Scorer | None = None) -> dict[str, Any]:
    """Rank-based metrics (slice ``all``) of a trained run on the fixed sample, plus ``ranks`` (each case's
    0-based target rank, in sample order), ``cached`` (whether the score was reused) and ``users``.
    ``scorer``: :func:`~learn_tasks.evaluation.harness.make_scorer` of that run, when the caller has one."""
    run_dir = Path(run_dir)
    key = score_key(cfg, dataset, run_dir, sample)
    if use_cache:
        hit = cached_score(cfg, dataset, key)
        if hit is not None:
            return {**hit, "cached": True}
    if scorer is None:
        scorer = make_scorer(cfg, dataset, protocol, kind, splits.load_split(cfg, dataset, protocol), run_dir)
    check_scorer(scorer, run_dir)  # the score is cached under run_dir's key
    cat = scorer.cat
    model_cases = Cases(sample.user_ids, sample.hist_offsets, cat.rows(sample.hist_items),
                        cat.rows(sample.target_items))
    user_vecs, item_vecs = scorer.vectors(model_cases)
    item_vecs = np.asarray(item_vecs)[cat.rows(sample.catalogue)]
    frozen = Catalogue(sample.catalogue, None, np.zeros(len(sample.catalogue), np.int64),
                       np.zeros(len(sample.catalogue), np.int64))
    rank_cases = Cases(sample.user_ids, sample.hist_offsets, frozen.rows(sample.hist_items),
                       frozen.rows(sample.target_items))
    ranked = rank_all(user_vecs, item_vecs, rank_cases, 0, cfg.evaluate.batch_users)  # ranks only, no top lists
    out = {**rank_metrics(ranked.ranks, cfg.evaluate.ks), "users": len(sample), "sample": sample.digest,
           "run_dir": str(run_dir), "ranks": [int(r) for r in ranked.ranks]}
    _remember(cfg, dataset, key, out)
    return {**out, "cached": False}
