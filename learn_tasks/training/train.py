"""PCH training: losses, length-bucketed batches, the training loop and run folders.

Losses (``train.loss``), all softmax over L2-normalised embeddings divided by ``temperature``:

* ``dense_all_action`` (LEARN / PinnerFormer): each training sequence is cut at a random point into a
  history (user tower) and a target part (item tower). ``n_history`` user embeddings sampled from history
  positions x ``n_target`` items sampled from the target are all positives; negatives are the other users'
  targets in the batch (plus ``n_random_negatives`` uniform catalogue items); a negative that is one of
  the user's own targets (an accidental hit) is masked out;
* ``next_item``: the user embedding at every position predicts the next item; negatives are a pool of
  in-batch positives plus random catalogue items (the SASRec objective with in-batch negatives);
* ``sampled_softmax``: the same, with random catalogue negatives only (the HSTU setup).

``logq`` subtracts the log of each candidate's expected count under the negative sampler (in-batch items
are drawn in proportion to their training popularity, random ones uniformly) so popular items are not
over-penalised.

Batches group sequences of similar length (length buckets), so little time is spent on padding. Content
embeddings are frozen inputs read once from the CEG store and never recomputed. The loop uses AdamW with a
linear warm-up and a cosine decay driven by whichever limit comes first (epochs or the wall-clock budget),
gradient clipping, early stopping on validation Recall@K, and stops on a non-finite loss keeping the last
good weights. The run folder is built under a temporary name and appears complete or not at all.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from learn_tasks.training import distributed as D
from learn_tasks.evaluation import evaluate as E
from learn_tasks.pch import registry
from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.pch.model import PCH, PCHConfig, build_model, load_checkpoint, save_checkpoint
from learn_tasks.storage import atomic_dir, write_json, write_parquet

log = logging.getLogger("learn.train")


# ==================================================================================================
# Losses (pure functions of embeddings and ids)
# ==================================================================================================
def dense_all_action_loss(
    user: Tensor, user_valid: Tensor, items: Tensor, item_ids: Tensor, item_valid: Tensor, temperature: float,
    neg: Tensor | None = None, neg_ids: Tensor | None = None,
    logq_items: Tensor | None = None, logq_neg: Tensor | None = None,
) -> Tensor:
    """PinnerFormer's dense all-action loss with in-batch negatives and accidental-hit masking.

    user [B, H, D] sampled user embeddings (``user_valid`` [B, H]); items [B, T, D] the users' targets with
    ids [B, T] (``item_valid`` [B, T]); optional extra negatives neg [R, D] with ids [R]; optional log
    sampling probabilities to subtract (logQ). Every valid (b, h, t) is a positive whose softmax runs over
    itself and all negatives of user b: targets of other users and extra items, minus any whose id is one of
    user b's own targets. Returns the mean over positive pairs.
    """
    B, H, D = user.shape
    T = items.shape[1]
    pos = torch.einsum("bhd,btd->bht", user, items) / temperature  # [B, H, T]: each user's own targets
    if logq_items is not None:
        pos = pos - logq_items[:, None, :]
    # Candidates = every valid target in the batch (padding dropped), then the extra negatives.
    valid_pos = item_valid.reshape(-1).nonzero().squeeze(1)  # [C]
    cand = items.reshape(B * T, D)[valid_pos]
    cand_ids, owner = item_ids.reshape(-1)[valid_pos], torch.div(valid_pos, T, rounding_mode="floor")
    if neg is not None and neg.shape[0]:
        cand, cand_ids = torch.cat([cand, neg]), torch.cat([cand_ids, neg_ids])
    logits = torch.einsum("bhd,cd->bhc", user, cand) / temperature  # [B, H, C (+R)]
    if logq_items is not None:
        lq = logq_items.reshape(-1)[valid_pos]
        if neg is not None and neg.shape[0]:
            lq = torch.cat([lq, logq_neg if logq_neg is not None else lq.new_zeros(neg.shape[0])])
        logits = logits - lq
    # Accidental hits: a candidate whose id is one of user b's targets (its own targets included) is no
    # negative for b. owns[b, u] = user b has unique id u among its targets.
    uniq, inv = torch.unique(cand_ids, return_inverse=True)
    owns = torch.zeros(B, len(uniq), dtype=torch.bool, device=user.device)
    owns[owner, inv[: len(valid_pos)]] = True
    logits = logits.masked_fill(owns[:, inv][:, None, :], float("-inf"))
    neg_lse = torch.logsumexp(logits, dim=-1)  # [B, H]
    loss = F.softplus(neg_lse[..., None] - pos)  # = -log softmax of the positive against its negatives
    m = (user_valid[:, :, None] & item_valid[:, None, :]).to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1)


def next_item_loss(
    query: Tensor, pos: Tensor, pos_ids: Tensor, cand: Tensor, cand_ids: Tensor, temperature: float,
    logq_pos: Tensor | None = None, logq_cand: Tensor | None = None,
) -> Tensor:
    """Sampled softmax: query [P, D] against its positive pos [P, D] and shared candidates cand [C, D].

    A candidate with the positive's id is masked (accidental hit). Returns the mean over the P queries.
    """
    pos_logit = (query * pos).sum(-1) / temperature  # [P]
    logits = query @ cand.T / temperature  # [P, C]
    if logq_pos is not None:
        pos_logit = pos_logit - logq_pos
    if logq_cand is not None:
        logits = logits - logq_cand[None, :]
    logits = logits.masked_fill(cand_ids[None, :] == pos_ids[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(logits, dim=-1) - pos_logit).mean()


# ==================================================================================================
# Sequences and length-bucketed batches
# ==================================================================================================
@dataclass
class Sequences:
    """Training sequences as catalogue rows, oldest first: ``rows[offsets[i]:offsets[i+1]]`` is user i."""

    user_ids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seq(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


def build_sequences(train: pd.DataFrame, cat: E.Catalogue, min_events: int = 2) -> tuple[Sequences, int]:
    """Per-user training sequences with at least ``min_events`` events; returns them and the users skipped."""
    df = train.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    sizes = df.groupby(S.USER_ID, sort=True).size()
    keep = sizes[sizes >= min_events]
    df = df[df[S.USER_ID].isin(keep.index)]
    offsets = np.concatenate([[0], np.cumsum(keep.to_numpy())]).astype(np.int64)
    return Sequences(keep.index.to_numpy(np.int64), offsets, cat.rows(df[S.ITEM_ID].to_numpy())), int(len(sizes) - len(keep))


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of indices with similar lengths, in random order; every index appears exactly once.

    Indices are sorted by length (ties in random order), cut into consecutive batches, and the batch order
    is shuffled, so padding is small and the model still sees lengths in random order.
    """
    lengths = np.asarray(lengths)
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``min(n, k)`` distinct positions of ``range(n)``, sorted."""
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


def dense_batches(seqs: Sequences, max_len: int, batch_size: int, n_history: int, n_target: int,
                  rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Dense all-action batches: a random cut per sequence into history (last ``max_len``) and targets."""
    n = seqs.lengths
    cut = 1 + np.floor(rng.random(len(n)) * (n - 1)).astype(np.int64)  # 1 .. n-1 history events
    hlen = np.minimum(cut, max_len)
    for idx in length_buckets(hlen, batch_size, rng):
        B, L = len(idx), int(hlen[idx].max())
        hist = np.zeros((B, L), np.int64)
        hmask = np.zeros((B, L), bool)
        hsel = np.zeros((B, n_history), np.int64)
        hvalid = np.zeros((B, n_history), bool)
        tgt = np.zeros((B, n_target), np.int64)
        tvalid = np.zeros((B, n_target), bool)
        for j, i in enumerate(idx):
            s, c, h = seqs.seq(i), cut[i], hlen[i]
            hist[j, :h] = s[c - h:c]
            hmask[j, :h] = True
            p = _sample(rng, h, n_history)
            hsel[j, :len(p)], hvalid[j, :len(p)] = p, True
            t = s[c:][_sample(rng, len(s) - c, n_target)]
            tgt[j, :len(t)], tvalid[j, :len(t)] = t, True
        # Short histories and few targets leave columns of pure padding: drop them (the loss is O(H x T)).
        H, T = max(1, int(hvalid.sum(1).max())), max(1, int(tvalid.sum(1).max()))
        yield {"hist": hist, "hist_mask": hmask, "hsel": hsel[:, :H], "hsel_valid": hvalid[:, :H],
               "tgt": tgt[:, :T], "tgt_valid": tvalid[:, :T]}


def next_item_batches(seqs: Sequences, max_len: int, batch_size: int,
                      rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Next-item batches: a window of up to ``max_len`` inputs and their next items (random window start)."""
    n = seqs.lengths
    w = np.minimum(n - 1, max_len)
    start = np.floor(rng.random(len(n)) * (n - 1 - w + 1)).astype(np.int64)
    for idx in length_buckets(w, batch_size, rng):
        B, L = len(idx), int(w[idx].max())
        inp = np.zeros((B, L), np.int64)
        out = np.zeros((B, L), np.int64)
        mask = np.zeros((B, L), bool)
        for j, i in enumerate(idx):
            s = seqs.seq(i)[start[i]:start[i] + w[i] + 1]
            inp[j, :w[i]], out[j, :w[i]], mask[j, :w[i]] = s[:-1], s[1:], True
        yield {"inp": inp, "out": out, "mask": mask}


# ==================================================================================================
# One optimisation step per loss family
# ==================================================================================================
@dataclass
class StepInputs:
    content: Tensor | None  # [N, d_in] on the device
    item_idx: Tensor  # [N] ID vocab rows
    logq: Tensor | None  # [N] log expected count of each catalogue row under the negative sampler
    n_items: int


def _item_table(model: PCH, rows: np.ndarray, si: StepInputs, device) -> tuple[Tensor, np.ndarray, Tensor]:
    """Per-item inputs for the unique ``rows``: (inputs [U, d_model], unique rows, their tensor)."""
    uniq = np.unique(rows)
    r = torch.as_tensor(uniq, device=device)
    x = model.embed_items(si.content[r] if si.content is not None else None, si.item_idx[r])
    return x, uniq, r


def _item_embeddings(model: PCH, x: Tensor, uniq: np.ndarray, r: Tensor, want: np.ndarray,
                     si: StepInputs, device) -> tuple[Tensor, np.ndarray]:
    """Item-tower embeddings of the unique ``want`` rows (a subset of ``uniq``)."""
    want = np.unique(want)
    pos = torch.as_tensor(np.searchsorted(uniq, want), device=device)
    if model.item_tower_reuses_inputs:
        return model.items_from_inputs(x[pos]), want
    rw = r[pos]
    return model.encode_items(si.content[rw], si.item_idx[rw]), want


def dense_step(model: PCH, b: dict[str, np.ndarray], si: StepInputs, tc, rng: np.random.Generator, device) -> Tensor:
    neg = rng.integers(0, si.n_items, size=tc.n_random_negatives) if tc.n_random_negatives else np.zeros(0, np.int64)
    hist_rows = b["hist"][b["hist_mask"]]
    x, uniq, r = _item_table(model, np.concatenate([hist_rows, b["tgt"][b["tgt_valid"]], neg]), si, device)
    hist_pos = np.zeros(b["hist"].shape, np.int64)
    hist_pos[b["hist_mask"]] = np.searchsorted(uniq, hist_rows)
    states = model.user_states(x[torch.as_tensor(hist_pos, device=device)])  # [B, L, out]
    B = states.shape[0]
    user = states[torch.arange(B, device=device)[:, None], torch.as_tensor(b["hsel"], device=device)]  # [B, H, out]
    emb, want = _item_embeddings(model, x, uniq, r, np.concatenate([b["tgt"][b["tgt_valid"]], neg]), si, device)
    tgt = torch.as_tensor(b["tgt"], device=device)
    items = emb[torch.as_tensor(np.searchsorted(want, b["tgt"]).clip(0, len(want) - 1), device=device)]
    neg_t = torch.as_tensor(neg, device=device)
    neg_emb = emb[torch.as_tensor(np.searchsorted(want, neg), device=device)] if len(neg) else None
    logq_items = si.logq[tgt] if (tc.logq and si.logq is not None) else None
    logq_neg = si.logq[neg_t] if (tc.logq and si.logq is not None and len(neg)) else None
    return dense_all_action_loss(user, torch.as_tensor(b["hsel_valid"], device=device), items, tgt,
                                 torch.as_tensor(b["tgt_valid"], device=device), tc.temperature,
                                 neg_emb, neg_t if len(neg) else None, logq_items, logq_neg)


def next_step(model: PCH, b: dict[str, np.ndarray], si: StepInputs, tc, rng: np.random.Generator, device) -> Tensor:
    mask = b["mask"]
    pos_rows = b["out"][mask]
    pool = []
    if tc.loss == "next_item":  # in-batch negatives: one positive drawn from each sequence
        pool.append(pos_rows[rng.integers(0, len(pos_rows), size=mask.shape[0])])
    if tc.n_random_negatives:
        pool.append(rng.integers(0, si.n_items, size=tc.n_random_negatives))
    cand_rows = np.concatenate(pool) if pool else np.zeros(0, np.int64)
    inp_rows = b["inp"][mask]
    x, uniq, r = _item_table(model, np.concatenate([inp_rows, pos_rows, cand_rows]), si, device)
    inp_pos = np.zeros(b["inp"].shape, np.int64)
    inp_pos[mask] = np.searchsorted(uniq, inp_rows)
    states = model.user_states(x[torch.as_tensor(inp_pos, device=device)])
    query = states[torch.as_tensor(mask, device=device)]  # [P, out]
    emb, want = _item_embeddings(model, x, uniq, r, np.concatenate([pos_rows, cand_rows]), si, device)
    pos = emb[torch.as_tensor(np.searchsorted(want, pos_rows), device=device)]
    cand = emb[torch.as_tensor(np.searchsorted(want, cand_rows), device=device)]
    pos_t, cand_t = torch.as_tensor(pos_rows, device=device), torch.as_tensor(cand_rows, device=device)
    use_q = tc.logq and si.logq is not None and tc.loss == "next_item"
    return next_item_loss(query, pos, pos_t, cand, cand_t, tc.temperature,
                          si.logq[pos_t] if use_q else None, si.logq[cand_t] if use_q else None)


# ==================================================================================================
# Training loop
# ==================================================================================================
# Settings each kind starts from (the validation choices of ``bench/quality.py``; its JSON keeps every run and
# the README's "Model: training and evaluation" section the figures); ``train.per_model`` entries are merged
# over them. Never chosen on test. SASRec: a one-setting-at-a-time sweep on loo validation Recall@200 (logQ
# correction, temperature 0.1, 2048 random negatives and dropout 0.2 each helped). learn_hybrid: the same
# sweep picked temperature 0.1 and logQ, but on temporal validation logQ halved long-tail recall (popular
# items win), so its ID dropout and logQ are chosen there under the cold-start / long-tail constraints (ID
# dropout 0.3 without logQ: the best all-items Recall@200 of the six candidates that keep 0.9x the
# content-only model's cold-start and its long-tail recall). Evidence weighting (mix_k) was chosen on
# temporal validation too: k = 10 gave the best all-items Recall@200 of 5 to 100 while doubling cold-start
# Recall@50.
KIND_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "learn": {},  # the paper's setup: dense all-action loss
    "learn_hybrid": {"model": {"id_dropout": 0.3, "mix_k": 10.0},
                     "train": {"loss": "next_item", "lr": 3e-3, "temperature": 0.1, "logq": False}},
    "sasrec": {"model": {"dropout": 0.2},  # standard SASRec: next-item loss at every position
               "train": {"loss": "next_item", "lr": 1e-3, "temperature": 0.1, "n_random_negatives": 2048,
                         "logq": True}},
}


def resolve(cfg: Settings, kind: str) -> Settings:
    """Settings for one model kind: KIND_DEFAULTS[kind] then ``train.per_model[kind]`` applied over the sections."""
    over = copy.deepcopy(KIND_DEFAULTS.get(kind, {}))
    for section, values in cfg.train.per_model.get(kind, {}).items():
        over.setdefault(section, {}).update(values)
    unknown = set(over) - {"model", "train"}
    if unknown:
        raise ValueError(f"train.per_model.{kind}: only 'model' and 'train' sections are allowed, got {sorted(unknown)}")
    return cfg.with_overrides(model={**over.get("model", {}), "kind": kind}, train=dict(over.get("train", {})))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, progress: float, base: float, warmup: int, floor: float = 0.1, warmup_share: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor * base`` as progress goes 0 -> 1.

    The warm-up ends after ``warmup`` steps or ``warmup_share`` of the progress, whichever comes first, so
    a short wall-clock budget still trains at the full rate.
    """
    warm = min(1.0, max((step + 1) / max(warmup, 1), progress / warmup_share))
    return base * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def validate(model: PCH, cat: E.Catalogue, cases: E.Cases, ks, batch: int, device) -> dict[str, float]:
    users, items = E.model_vectors(model, cat, cases, batch, device)
    ranked = E.rank_all(users, items, cases, max(ks), batch)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = E.recall_at_k(ranked.ranks, k)
        out[f"ndcg@{k}"] = E.ndcg_at_k(ranked.ranks, k)
    return out


def _warm_start(model: PCH, pcfg: PCHConfig, cat: E.Catalogue, warm_dir: Path) -> None:
    """Copy a previous run's weights; ID rows are moved to the new vocab by item id (new items start fresh)."""
    old, ocfg = load_checkpoint(warm_dir)
    mine = {k: v for k, v in asdict(pcfg).items() if k != "n_items"}
    theirs = {k: v for k, v in asdict(ocfg).items() if k != "n_items"}
    for k in ("dropout", "id_dropout", "mix_k"):  # training and inference settings, not the architecture
        mine.pop(k, None), theirs.pop(k, None)
    if mine != theirs:
        raise ValueError(f"warm start from {warm_dir}: architecture differs ({theirs} vs {mine})")
    state = old.state_dict()
    new_state = model.state_dict()
    for k, v in state.items():
        if k == "id_count":
            continue  # recounted from this run's training data
        if k == "item_id.weight":
            vocab = pd.read_parquet(warm_dir / "items.parquet")
            old_idx = pd.Series(vocab["item_idx"].to_numpy(), index=vocab[S.ITEM_ID].to_numpy())
            prev = old_idx.reindex(cat.item_ids, fill_value=0).to_numpy()
            both = (cat.item_idx > 0) & (prev > 0)
            w = new_state[k].clone()
            w[0] = v[0]
            w[torch.as_tensor(cat.item_idx[both])] = v[torch.as_tensor(prev[both])]
            new_state[k] = w
        else:
            new_state[k] = v
    model.load_state_dict(new_state)


def run(cfg: Settings, dataset: str, protocol: str = S.PROTOCOL_LOO, model: str = "learn", epochs: int | None = None,
        budget_s: float | None = None, warm_start: str | Path | None = None,
        embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Train one model kind on a dataset's split; write a complete run folder and return its summary.

    ``embeddings`` = (item ids, vectors) replaces the CEG store (tests, experiments); by default the current
    embedding version of ``dataset`` is read with :func:`learn_tasks.ceg.encode.load_embeddings`.
    """
    from learn_tasks.data import datasets as data

    if model not in E.NEURAL_KINDS:
        raise ValueError(f"cannot train {model!r}; trainable kinds are {E.NEURAL_KINDS}")
    cfg = resolve(cfg, model)
    tc, mc = cfg.train, cfg.model
    epochs = epochs if epochs is not None else tc.epochs
    budget = budget_s if budget_s is not None else tc.budget_s
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    device = pick_device(tc.device)
    t_setup = time.perf_counter()

    split = data.load_split(cfg, dataset, protocol)
    train_df = split[split[S.SPLIT] == S.TRAIN]
    ids = E.catalogue_item_ids(cfg, dataset, split)
    pop = E.item_popularity(train_df, ids)
    item_idx = np.zeros(len(ids), np.int64)
    item_idx[pop > 0] = np.arange(1, int((pop > 0).sum()) + 1)  # ID vocab: items seen in training
    content, fp = (None, None)
    if model != "sasrec":
        content, fp = E.load_content(cfg, dataset, ids, embeddings, encode_missing=tc.encode_missing)
        if not np.isfinite(content).all():
            bad = ids[~np.isfinite(content).all(1)]
            raise ValueError(f"non-finite content embeddings for {len(bad)} item(s), e.g. {bad[:10].tolist()}")
    cat = E.Catalogue(ids, content, item_idx, pop, fp)
    seqs, skipped = build_sequences(train_df, cat)
    if not len(seqs):
        raise ValueError(f"dataset {dataset!r} ({protocol}) has no training user with 2 or more events")
    val_cases = E.sample_cases(E.build_cases(split, cat, protocol, S.VALID), tc.val_users, tc.seed)
    if not len(val_cases):
        log.warning("no validation cases for %s/%s: no early stopping, the last epoch is kept", dataset, protocol)

    pcfg = PCHConfig(kind=model, item_tower=mc.item_tower, d_in=content.shape[1] if content is not None else 0,
                     d_model=mc.d_model, n_layers=mc.n_layers, n_heads=mc.n_heads, dropout=mc.dropout,
                     max_len=mc.max_len, out_dim=mc.out_dim, n_items=int(item_idx.max()), id_dropout=mc.id_dropout,
                     mix_k=mc.mix_k)
    net = build_model(pcfg)
    if content is not None:
        net.content_mean.copy_(torch.as_tensor(content.mean(0)))  # centre on the catalogue mean
    if warm_start:
        _warm_start(net, pcfg, cat, Path(warm_start))
    if pcfg.kind == "learn_hybrid":  # training events per ID row: the evidence weights of mix_k
        counts = np.zeros(pcfg.n_items + 1, np.float32)
        counts[item_idx[pop > 0]] = pop[pop > 0]
        net.id_count.copy_(torch.as_tensor(counts))
    net.to(device).train()
    D.broadcast_module(net)  # data-parallel runs start from rank 0's weights (no-op in one process)
    si = StepInputs(
        torch.as_tensor(content, device=device) if content is not None else None,
        torch.as_tensor(item_idx, device=device),
        _logq(pop, tc, len(ids)).to(device) if tc.logq else None, len(ids))

    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "item_id" not in n and "pos" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.dim() >= 2 and "item_id" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(math.ceil(len(seqs) / tc.batch_size) / D.world_size())  # per rank
    total_steps = max(1, epochs * steps_per_epoch)
    warmup = min(tc.warmup_steps, max(1, total_steps // 10))  # short runs still reach the full learning rate
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    log_lines: list[dict[str, Any]] = []
    best_state = copy.deepcopy(net.state_dict())  # the last good weights (initial ones until validated)
    best_val, best_epoch, bad_epochs = -1.0, 0, 0
    stopped, step, seqs_seen, train_time = "epochs", 0, 0, 0.0
    t0 = time.perf_counter()
    setup_s = t0 - t_setup
    for epoch in range(1, epochs + 1):
        epoch_state = copy.deepcopy(net.state_dict())
        te, losses, n_seq = time.perf_counter(), [], 0
        batches = (dense_batches(seqs, pcfg.max_len, tc.batch_size, tc.n_history, tc.n_target, rng)
                   if tc.loss == "dense_all_action" else next_item_batches(seqs, pcfg.max_len, tc.batch_size, rng))
        nan = False
        for b in D.shard_batches(batches, rng):  # this rank's share (all batches in one process)
            progress = max(step / total_steps, (time.perf_counter() - t0) / budget if budget else 0.0)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, progress, tc.lr, warmup)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = (dense_step if tc.loss == "dense_all_action" else next_step)(net, b, si, tc, rng, device)
            if D.any_across(not torch.isfinite(loss)):  # every rank stops together
                nan = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            D.average_gradients(net)
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            n_seq += len(next(iter(b.values())))
            step += 1
            if budget and D.any_across(time.perf_counter() - t0 > budget):
                stopped = "budget"
                break
        epoch_time = time.perf_counter() - te
        train_time += epoch_time
        seqs_seen += n_seq
        if nan:
            log.error("non-finite loss at epoch %d step %d: stopping, keeping the last good weights", epoch, step)
            stopped = "nan_loss"
            if best_val < 0:
                best_state = epoch_state
            break
        val = validate(net, cat, val_cases, cfg.evaluate.ks, cfg.evaluate.batch_users, device) if len(val_cases) else {}
        n_seq = int(D.sum_across(n_seq))  # all ranks
        line = {"epoch": epoch, "step": step, "loss": D.mean_across(float(np.mean(losses)) if losses else float("nan")),
                "sequences_per_s": n_seq / max(epoch_time, 1e-9), "lr": opt.param_groups[0]["lr"],
                "elapsed_s": time.perf_counter() - t0, **{f"val_{k}": v for k, v in val.items()}}
        log_lines.append(line)
        log.info("epoch %d/%d loss %.4f  %.0f seq/s  %s  lr %.2e  %.0fs", epoch, epochs, line["loss"],
                 line["sequences_per_s"], "  ".join(f"{k} {v:.4f}" for k, v in val.items()), line["lr"],
                 line["elapsed_s"])
        metric = val.get(tc.early_stop_metric)
        if metric is None:
            best_state, best_epoch = copy.deepcopy(net.state_dict()), epoch
        elif metric > best_val:
            best_val, best_epoch, bad_epochs = metric, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= tc.patience:
                stopped = "early_stopping"
                break
        if stopped == "budget":
            break
    net.load_state_dict(best_state)
    net.eval()

    run_dir = Path(D.broadcast_str(str(registry.new_run_dir(cfg, dataset, model))))  # rank 0 names it
    created = datetime.now(timezone.utc).isoformat()
    summary = {
        "run_dir": str(run_dir), "run_id": run_dir.name, "dataset": dataset, "protocol": protocol, "kind": model,
        "stopped": stopped, "epochs_run": len(log_lines) + (1 if stopped == "nan_loss" else 0),
        "best_epoch": best_epoch, "steps": step,
        "val": {tc.early_stop_metric: best_val} if best_val >= 0 else None,
        "val_metrics": next((l for l in log_lines if l["epoch"] == best_epoch), None),
        "sequences_per_s": seqs_seen / max(train_time, 1e-9), "train_seconds": train_time, "setup_seconds": setup_s,
        "train_sequences": len(seqs), "skipped_users": skipped, "val_users": len(val_cases),
        "items": len(cat), "id_vocab": int(item_idx.max()), "device": str(device), "peak_rss_mb": peak_rss_mb(),
        "embedding_fingerprint": fp,
    }
    meta = {
        **summary, "created": created, "model_config": asdict(pcfg),
        "settings": {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "evaluate": cfg.evaluate.model_dump()},
        "slices": {"tail_share": cfg.evaluate.tail_share, "cold_user_max_events": cfg.evaluate.cold_user_max_events,
                   "long_tail_max_popularity": int(pop[E.tail_mask(pop, cfg.evaluate.tail_share)].max(initial=0))},
        "warm_start": str(warm_start) if warm_start else None,
    }
    if D.is_main():  # one writer in a data-parallel run
        with atomic_dir(run_dir) as tmp:
            save_checkpoint(net, pcfg, tmp)
            write_parquet(cat.vocab_frame(cfg.evaluate.tail_share), tmp / "items.parquet")
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(l) + "\n" for l in log_lines), encoding="utf-8")
            write_json(meta, tmp / registry.META)
    D.barrier()
    log.info("saved %s (%s after %d epoch(s), best epoch %d)", run_dir, stopped, summary["epochs_run"], best_epoch)
    return summary


def _logq(pop: np.ndarray, tc, n_items: int) -> Tensor:
    """Log expected count of each item among one query's candidates: in-batch ~ popularity, random ~ uniform."""
    p = pop / max(pop.sum(), 1)
    n_in = tc.batch_size * (tc.n_target if tc.loss == "dense_all_action" else 1)
    expected = n_in * p + tc.n_random_negatives / n_items
    return torch.as_tensor(np.log(np.maximum(expected, 1e-12)), dtype=torch.float32)
