"""Per-kind settings of the trainable models, read from ``configs/models/<kind>.yaml``.

Each file holds the ``model:`` and ``train:`` values its kind starts from (chosen on validation by
``bench/quality.py``; the comment header of each file says what was run), so the numbers live in one
place a reader can find without reading code. ``train.per_model[kind]`` entries of the settings are merged
over them by :func:`resolve`.
"""
from __future__ import annotations

from typing import Any

import yaml

from learn_tasks.config import MODEL_CONFIG_DIR, MODEL_KINDS, Settings

SECTIONS = ("model", "train")


def kind_settings(kind: str) -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "train": {...}}`` of ``configs/models/<kind>.yaml`` (sections may be empty)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"no settings for model kind {kind!r}; trainable kinds are {MODEL_KINDS}")
    path = MODEL_CONFIG_DIR / f"{kind}.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
        raise ValueError(f"{path}: only the sections {SECTIONS} are allowed")
    out = {}
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: {section!r} must be a mapping")
        out[section] = dict(values)
    return out


def resolve(cfg: Settings, kind: str) -> Settings:
    """Settings for one model kind: ``configs/models/<kind>.yaml``, then ``train.per_model[kind]`` over the sections."""
    over: dict[str, dict[str, Any]] = kind_settings(kind)
    for section, values in cfg.train.per_model.get(kind, {}).items():
        over.setdefault(section, {}).update(values)
    unknown = set(over) - set(SECTIONS)
    if unknown:
        raise ValueError(f"train.per_model.{kind}: only 'model' and 'train' sections are allowed, got {sorted(unknown)}")
    return cfg.with_overrides(model={**over["model"], "kind": kind}, train=dict(over["train"]))
