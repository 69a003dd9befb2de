"""PCH twin towers (LEARN's preference comprehension) and the ID-based SASRec baseline, in one small file.

Three model kinds share one causal pre-LN transformer:

* ``learn``        the paper's content-only towers: the input of each position is the item's frozen content
                   embedding (centred on the catalogue mean), through the content adaptor and a LayerNorm;
* ``learn_hybrid`` content adaptor + a learned item-ID embedding. During training an item's ID embedding is
                   replaced with probability ``id_dropout`` by one shared *unknown-item* embedding (row 0),
                   and items unseen in training always use it, so a cold-start item is represented from
                   content alone and a warm item from both;
* ``sasrec``       ID only: one item-ID embedding table used as the transformer input and as the item tower
                   (the standard SASRec form); it ignores content.

Towers. The user tower runs the transformer over the user's history; its output at position t is the user
after t+1 events. The item tower is one of the paper's variants:

* ``a`` the same transformer, same weights, over the item alone (a length-1 sequence; the default),
* ``b`` a separate transformer of the same shape over the item alone,
* ``c`` a linear projection of the (centred) raw content embedding.

**Evidence weighting** (``learn_hybrid`` with ``mix_k`` > 0, inference only). A warm item's ID embedding makes
its score sharper than a cold item's content-only score, so a plain hybrid rarely ranks never-seen items.
With ``mix_k`` = k the score of item i is ``w_i <u, v_i> + (1 - w_i) <u', v'_i>`` where the unprimed
vectors use the item IDs, the primed ones use the unknown-item row for every item (the content pathway
the ID dropout trains), and ``w_i = n_i / (n_i + k)`` with ``n_i`` the item's training events (the
``id_count`` buffer): a cold item is scored from content alone, a popular one almost only with its ID.
The towers then return the concatenation ``[u, u']`` and ``[w v, (1 - w) v']`` (``2 * out_dim`` wide), so
the mixed score is still one inner product for Milvus. A stored item vector is an *item* side, never a query:
searching with it (the ``content_based_seed`` strategy) would weight the seed's content half by its own
``1 - w``, which is near 0 for a popular seed, so an item with the seed's text but no evidence would score
about 0. :func:`seed_query` turns a stored item vector back into the query ``[v, v']`` (what the user tower
gives for a one-item history with item tower ``a``): then an item with the seed's text scores
``<v', v'_new>``, about 1.

Every item is encoded alone, in training and at serving, so an item embedding depends only on that item
(its text, plus its ID for the hybrid): an item with zero interactions has one, and there is no train/serve
skew. Both towers end in the same online projection to ``out_dim`` and an L2 normalisation, so a score is
a cosine similarity (``similarity="dot"`` leaves the normalisation out: a raw inner product, SASRec's
original form).

Sequences are **left-aligned**: position 0 is the oldest kept event and padding follows the last valid event
(``mask`` True on events). With causal attention a valid position never attends to padding, so no key mask
is needed. :meth:`PCH.encode_users` also accepts right-aligned input and re-aligns it.

Checkpoints are ``model.safetensors`` (weights and buffers, including the content centring vector) plus
``config.json`` (the :class:`PCHConfig`); loading never unpickles anything.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from learn_tasks.config import MODEL_KINDS
from learn_tasks.storage import atomic_path

ITEM_TOWERS = ("a", "b", "c")
SIMILARITIES = ("cosine", "dot")
POSITIONS = ("from_start", "from_end")
BLOCKS = ("pre_ln", "sasrec")
UNKNOWN_ITEM = 0  # row of the ID vocab shared by every item not seen in training


@dataclass(frozen=True)
class PCHConfig:
    kind: str = "learn"  # learn | learn_hybrid | sasrec
    item_tower: str = "a"  # a | b | c (content kinds)
    d_in: int = 384  # width of the frozen content embeddings
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    max_len: int = 50
    out_dim: int = 64
    n_items: int = 0  # ID vocab size without the unknown row: ids 1..n_items, 0 = unknown
    id_dropout: float = 0.1  # learn_hybrid: probability of replacing an ID embedding by the unknown one
    mix_k: float = 0.0  # learn_hybrid: evidence weighting at inference (0 = off), see the module docstring
    similarity: str = "cosine"  # cosine: L2-normalised tower outputs; dot: raw inner products
    positions: str = "from_start"  # from_start: position 0 = oldest kept event; from_end: max_len - 1 = newest
    block: str = "pre_ln"  # pre_ln: nanoGPT-style blocks; sasrec: SASRec's published blocks, init and output

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"item_tower must be one of {ITEM_TOWERS}, got {self.item_tower!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.kind != "learn" and self.n_items < 1:
            raise ValueError(f"kind {self.kind!r} needs an ID vocab (n_items >= 1)")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.block == "sasrec" and self.out_dim != self.d_model:
            raise ValueError(f"block 'sasrec' has no output projection: out_dim ({self.out_dim}) must equal "
                             f"d_model ({self.d_model})")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.mix_k < 0 or (self.mix_k > 0 and self.kind != "learn_hybrid"):
            raise ValueError(f"mix_k must be >= 0 and is for learn_hybrid only, got {self.mix_k} for {self.kind!r}")

    @property
    def uses_content(self) -> bool:
        return self.kind != "sasrec"

    @property
    def uses_ids(self) -> bool:
        return self.kind != "learn"

    @property
    def vector_dim(self) -> int:
        """Width of the served user and item vectors (twice ``out_dim`` with evidence weighting)."""
        return 2 * self.out_dim if self.mix_k > 0 else self.out_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PCHConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------------
# The transformer (nanoGPT-style, pre-LN, causal)
# --------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, c: PCHConfig, attn_dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.attn_dropout = c.n_heads, attn_dropout
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: Tensor, kv: Tensor | None = None) -> Tensor:  # x: [B, L, d]; keys/values from kv (x)
        B, L, d = x.shape
        if kv is None:
            q, k, v = self.qkv(x).split(d, dim=2)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:d], b[:d])
            k, v = F.linear(kv, w[d:], b[d:]).split(d, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # [B, h, L, dh]
        # The pre-LN blocks use no dropout on attention weights (it forces the slow unfused path on CPU;
        # residual dropout regularises); SASRec's blocks do, as published.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    def __init__(self, c: PCHConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.d_model), CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class SASRecBlock(nn.Module):
    """SASRec's block as published (Kang & McAuley, 2018, and its reference code): queries from
    LayerNorm(x) attend over x with dropout on the attention weights, the normalised queries are the
    residual; then a LayerNorm and a point-wise ReLU feed-forward of width d_model with its own residual."""

    def __init__(self, c: PCHConfig):
        super().__init__()
        d = c.d_model
        self.ln_attn, self.attn = nn.LayerNorm(d, eps=1e-8), CausalSelfAttention(c, attn_dropout=c.dropout)
        self.ln_ffn = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(c.dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(c.dropout))

    def forward(self, x: Tensor) -> Tensor:
        q = self.ln_attn(x)
        x = self.ln_ffn(q + self.attn(q, kv=x))
        return x + self.ffn(x)


class Transformer(nn.Module):
    """Learned positions + causal blocks + final LayerNorm: [B, L, d] inputs -> [B, L, d] states.

    Positions ``from_start`` number the events of a (left-aligned) row from its oldest kept event;
    ``from_end`` number them back from the newest, so the most recent event always has position
    ``max_len - 1`` and the position read at prediction time is the best-trained one (SASRec's layout:
    most histories are short, so high positions counted from the start are rarely trained).
    """

    def __init__(self, c: PCHConfig):
        super().__init__()
        self.from_end, self.max_len = c.positions == "from_end", c.max_len
        self.scale = c.d_model ** 0.5 if c.block == "sasrec" else 1.0  # SASRec scales item inputs by sqrt(d)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList((SASRecBlock if c.block == "sasrec" else Block)(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=1e-8 if c.block == "sasrec" else 1e-5)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``lengths`` [B]: events per (left-aligned) row; None = every position is an event."""
        if self.scale != 1.0:
            x = x * self.scale
        if self.from_end:
            n = lengths if lengths is not None else torch.full(x.shape[:1], x.shape[1], device=x.device)
            idx = (self.max_len - n)[:, None] + torch.arange(x.shape[1], device=x.device)[None, :]
            x = self.drop(x + self.pos(idx.clamp(0, self.max_len - 1)))
        else:
            x = self.drop(x + self.pos.weight[: x.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


# --------------------------------------------------------------------------------------------------
# Twin towers
# --------------------------------------------------------------------------------------------------
class PCH(nn.Module):
    def __init__(self, c: PCHConfig):
        super().__init__()
        self.config = c
        if c.uses_content:
            # Frozen sentence embeddings are nearly collinear across a catalogue; centring them on the
            # catalogue mean (a buffer set by training, saved with the weights) and a LayerNorm after the
            # adaptor give the small transformer a usable signal.
            self.register_buffer("content_mean", torch.zeros(c.d_in))
            self.adaptor = nn.Linear(c.d_in, c.d_model)
            self.ln_in = nn.LayerNorm(c.d_model)
        if c.uses_ids:
            self.item_id = nn.Embedding(c.n_items + 1, c.d_model)  # row 0 = unknown item
            nn.init.normal_(self.item_id.weight, std=0.02 if c.kind == "learn_hybrid" else 0.1)
        if c.kind == "learn_hybrid":
            self.register_buffer("id_count", torch.zeros(c.n_items + 1))  # training events per ID row (set by training)
        self.transformer = Transformer(c)
        if c.kind != "sasrec" and c.item_tower == "b":
            self.item_transformer = Transformer(c)
        if c.kind != "sasrec" and c.item_tower == "c":
            self.item_direct = nn.Linear(c.d_in, c.d_model)
        # the online projection, shared by both towers (SASRec's blocks have none: item embeddings are the output)
        self.head = nn.Identity() if c.block == "sasrec" else nn.Linear(c.d_model, c.out_dim)
        if c.block == "sasrec":  # SASRec's initialisation: Xavier-normal matrices (embeddings included)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.xavier_normal_(p)

    # ---- inputs ------------------------------------------------------------------------------------
    def _id_input(self, item_idx: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
        c = self.config
        if item_idx is None:
            if c.kind == "sasrec":
                raise ValueError("sasrec needs item_idx")
            item_idx = torch.full(shape, UNKNOWN_ITEM, dtype=torch.long, device=device)
        if self.training and c.kind == "learn_hybrid" and c.id_dropout > 0:
            drop = torch.rand(item_idx.shape, device=item_idx.device) < c.id_dropout
            item_idx = item_idx.masked_fill(drop, UNKNOWN_ITEM)
        return self.item_id(item_idx)

    def embed_items(self, content: Tensor | None, item_idx: Tensor | None) -> Tensor:
        """Per-item transformer input: [..., d_in] content and/or [...] ID rows -> [..., d_model]."""
        c = self.config
        if not c.uses_content:
            return self._id_input(item_idx, None, None)
        if content is None:
            raise ValueError(f"model kind {c.kind!r} needs content embeddings")
        x = self.ln_in(self.adaptor(content - self.content_mean))
        if c.uses_ids:
            x = x + self._id_input(item_idx, x.shape[:-1], x.device)
        return x

    def project(self, h: Tensor) -> Tensor:
        out = self.head(h)
        return F.normalize(out, dim=-1) if self.config.similarity == "cosine" else out

    # ---- towers ------------------------------------------------------------------------------------
    def user_states(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Left-aligned inputs [B, L, d_model] (``mask`` [B, L]: events; None = all) -> user embeddings at every
        position [B, L, out] (L2-normalised with cosine similarity)."""
        return self.project(self.transformer(x, mask.sum(1) if mask is not None else None))

    @property
    def item_tower_reuses_inputs(self) -> bool:
        """True when the item tower starts from :meth:`embed_items` (all but variant c)."""
        return self.config.kind == "sasrec" or self.config.item_tower != "c"

    def items_from_inputs(self, x: Tensor) -> Tensor:
        """Item tower (sasrec, variants a and b) from per-item inputs [N, d_model] -> [N, out]."""
        c = self.config
        if c.kind == "sasrec":
            return self.project(x)  # the input embedding table is also the output table
        if c.item_tower == "a":
            return self.project(self.transformer(x[:, None, :])[:, 0])
        return self.project(self.item_transformer(x[:, None, :])[:, 0])

    @property
    def mixing(self) -> bool:
        return self.config.mix_k > 0 and not self.training

    def encode_items(self, content: Tensor | None, item_idx: Tensor | None = None) -> Tensor:
        """[N, d_in] content (+ [N] ID rows, 0 = unknown) -> [N, vector_dim] item embeddings (L2-normalised
        halves; with evidence weighting ``[w v, (1 - w) v']``)."""
        if not self.mixing:
            return self._encode_items(content, item_idx)
        n = self.id_count[item_idx] if item_idx is not None else torch.zeros(content.shape[:-1], device=content.device)
        w = (n / (n + self.config.mix_k))[..., None]
        return torch.cat([w * self._encode_items(content, item_idx), (1 - w) * self._encode_items(content, None)], -1)

    def _encode_items(self, content: Tensor | None, item_idx: Tensor | None = None) -> Tensor:
        if self.item_tower_reuses_inputs:
            return self.items_from_inputs(self.embed_items(content, item_idx))
        if content is None:
            raise ValueError(f"model kind {self.config.kind!r} needs content embeddings")
        h = self.item_direct(content - self.content_mean)  # variant c: the raw content, projected
        if self.config.uses_ids:
            h = h + self._id_input(item_idx, h.shape[:-1], h.device)
        return self.project(h)

    def encode_users(self, content: Tensor | None, mask: Tensor, item_idx: Tensor | None = None) -> Tensor:
        """[B, L, d_in] history (+ [B, L] ID rows), [B, L] event mask -> [B, vector_dim] after the last event
        (with evidence weighting ``[u, u']``: the user read with and without the IDs of the history).

        Sequences longer than ``max_len`` keep their most recent events. Rows with no event get the
        embedding of an empty history's first position (callers should not ask for them).
        """
        if not self.mixing:
            return self._encode_users(content, mask, item_idx)
        if item_idx is None:  # no IDs given: both readings are the ID-free one
            u = self._encode_users(content, mask, None)
            return torch.cat([u, u], -1)
        # Both readings in one pass of twice the rows (without IDs = every ID the unknown row, as
        # ``_id_input`` does for None): at serving time a request is one user, where the tower's cost is
        # per-call overhead, not arithmetic.
        B = mask.shape[0]
        both = self._encode_users(None if content is None else torch.cat([content, content]), torch.cat([mask, mask]),
                                  torch.cat([item_idx, torch.full_like(item_idx, UNKNOWN_ITEM)]))  # [2B, out]
        return torch.cat([both[:B], both[B:]], -1)

    def _encode_users(self, content: Tensor | None, mask: Tensor, item_idx: Tensor | None = None) -> Tensor:
        content, mask, item_idx = left_align(content, mask, item_idx)
        L = self.config.max_len
        if mask.shape[1] > L:  # keep the most recent max_len events of each row
            n = mask.sum(1)
            start = (n - L).clamp(min=0)
            idx = start[:, None] + torch.arange(L, device=mask.device)[None, :]
            idx = idx.clamp(max=mask.shape[1] - 1)
            mask = torch.gather(mask, 1, idx) & (torch.arange(L, device=mask.device)[None, :] < n[:, None])
            if content is not None:
                content = torch.gather(content, 1, idx[..., None].expand(-1, -1, content.shape[-1]))
            if item_idx is not None:
                item_idx = torch.gather(item_idx, 1, idx)
        lengths = mask.sum(1)
        states = self.transformer(self.embed_items(content, item_idx), lengths)  # [B, L, d_model]
        last = (lengths - 1).clamp(min=0)
        # Only the last event's state is projected: the same vector as user_states()[:, last], L times less work.
        return self.project(states[torch.arange(states.shape[0], device=states.device), last])  # [B, out]


def seed_query(vectors, out_dim: int):
    """Stored evidence-weighted item vectors ``[w v, (1 - w) v']`` -> seed queries ``[v, v']`` (numpy, [..., 2 out_dim]).

    Each half is re-normalised; a half that is 0 (``w`` = 0 for an item without training evidence, whose ID
    pathway is then the unknown row, so ``v = v'``) takes the other half.
    """
    import numpy as np

    x = np.asarray(vectors, np.float32)
    a, b = x[..., :out_dim], x[..., out_dim:]
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    eps = 1e-12
    ua = np.where(na > eps, a / np.maximum(na, eps), b / np.maximum(nb, eps))
    ub = np.where(nb > eps, b / np.maximum(nb, eps), ua)
    return np.concatenate([ua, ub], -1).astype(np.float32)


def left_align(content: Tensor | None, mask: Tensor, item_idx: Tensor | None) -> tuple:
    """Move each row's events to the front, keeping their order (a no-op for left-aligned input)."""
    mask = mask.bool()
    if mask.shape[1] == 0 or bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return content, mask, item_idx
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # events first, in order
    mask = torch.gather(mask, 1, order)
    if content is not None:
        content = torch.gather(content, 1, order[..., None].expand(-1, -1, content.shape[-1]))
    if item_idx is not None:
        item_idx = torch.gather(item_idx, 1, order)
    return content, mask, item_idx


def build_model(cfg: PCHConfig) -> PCH:
    """A freshly initialised model (seed torch beforehand for reproducible weights)."""
    return PCH(cfg)


# --------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, no pickle
# --------------------------------------------------------------------------------------------------
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_checkpoint(model: PCH, cfg: PCHConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS, ".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "kind": cfg.kind})
    with atomic_path(directory / CONFIG) as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[PCH, PCHConfig]:
    """Rebuild a model from ``config.json`` and load ``model.safetensors``; returned in eval mode."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: checkpoint file missing")
    cfg = PCHConfig.from_dict(json.loads((directory / CONFIG).read_text(encoding="utf-8")))
    model = PCH(cfg)
    state = load_file(str(directory / WEIGHTS))
    if cfg.kind == "learn_hybrid" and "id_count" not in state and cfg.mix_k == 0:
        state["id_count"] = model.id_count  # a checkpoint from before evidence weighting (unused without it)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg
