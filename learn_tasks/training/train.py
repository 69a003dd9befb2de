"""PCH training: one optimisation step per loss family, the training loop and run folders.

The losses are in :mod:`learn_tasks.pch.losses` (``train.loss``: ``dense_all_action``, ``next_item``,
``sampled_softmax``), the length-bucketed batches in :mod:`learn_tasks.training.batches`, the per-kind
settings in ``configs/models/<kind>.yaml`` (:mod:`learn_tasks.pch.kinds`). Content embeddings are frozen
inputs read once from the CEG store and never recomputed; with ``train.encode_missing`` items missing from
the store are encoded first (:func:`learn_tasks.ceg.encode.encode_catalogue`), a decision taken here and
nowhere else. The loop uses AdamW with a linear warm-up and a cosine decay driven by whichever limit comes
first (epochs or the wall-clock budget), gradient clipping, early stopping on validation Recall@K, and stops
on a non-finite loss keeping the last good weights. The run folder is built under a temporary name and
appears complete or not at all. Under ``torch.distributed`` every rank runs :func:`train_model`; the hooks
of :mod:`learn_tasks.training.distributed` do nothing in a single process.
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
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from learn_tasks import schema as S
from learn_tasks.ceg.encode import encode_catalogue
from learn_tasks.config import MODEL_KINDS, Settings
from learn_tasks.data.splits import load_split
from learn_tasks.evaluation.harness import Cases, build_cases, model_vectors, rank_all, sample_cases
from learn_tasks.evaluation.metrics import coverage_at_k, ndcg_at_k, recall_at_k
from learn_tasks.pch import kinds, registry
from learn_tasks.pch.catalogue import Catalogue, MissingContent, tail_mask, training_catalogue
from learn_tasks.pch.losses import bce_loss, dense_all_action_loss, full_softmax_loss, logq, next_item_loss
from learn_tasks.pch.model import PCH, PCHConfig, build_model, load_checkpoint, save_checkpoint
from learn_tasks.storage import atomic_dir, write_json, write_parquet
from learn_tasks.training import distributed as D
from learn_tasks.training.batches import build_sequences, dense_batches, next_item_batches

log = logging.getLogger("learn.train")


# ==================================================================================================
# One optimisation step per loss family
# ==================================================================================================
@dataclass
class StepInputs:
    content: Tensor | None  # [N, d_in] on the device
    item_idx: Tensor  # [N] ID vocab rows
    logq: Tensor | None  # [N] log expected count of each catalogue row under the negative sampler
    n_items: int
    neg_pool: np.ndarray  # catalogue rows uniform negatives are drawn from (ID-only models: rows with an ID)

    def negatives(self, rng: np.random.Generator, size) -> np.ndarray:
        return self.neg_pool[rng.integers(0, len(self.neg_pool), size=size)]


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
    neg = si.negatives(rng, tc.n_random_negatives) if tc.n_random_negatives else np.zeros(0, np.int64)
    hist_rows = b["hist"][b["hist_mask"]]
    x, uniq, r = _item_table(model, np.concatenate([hist_rows, b["tgt"][b["tgt_valid"]], neg]), si, device)
    hist_pos = np.zeros(b["hist"].shape, np.int64)
    hist_pos[b["hist_mask"]] = np.searchsorted(uniq, hist_rows)
    states = model.user_states(x[torch.as_tensor(hist_pos, device=device)],
                               torch.as_tensor(b["hist_mask"], device=device))  # [B, L, out]
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
    """One step of the next-item losses: every valid position predicts the item after it."""
    mask = b["mask"]
    pos_rows = b["out"][mask]
    pool = []
    if tc.loss == "next_item":  # in-batch negatives: one positive drawn from each sequence
        pool.append(pos_rows[rng.integers(0, len(pos_rows), size=mask.shape[0])])
    if tc.n_random_negatives and tc.loss in ("next_item", "sampled_softmax"):
        pool.append(si.negatives(rng, tc.n_random_negatives))
    if tc.loss == "bce":  # negatives of each position, drawn uniformly
        pool.append(si.negatives(rng, len(pos_rows) * tc.bce_negatives))
    if tc.loss == "full_softmax":
        pool.append(si.neg_pool)
    cand_rows = np.concatenate(pool) if pool else np.zeros(0, np.int64)
    inp_rows = b["inp"][mask]
    x, uniq, r = _item_table(model, np.concatenate([inp_rows, pos_rows, cand_rows]), si, device)
    inp_pos = np.zeros(b["inp"].shape, np.int64)
    inp_pos[mask] = np.searchsorted(uniq, inp_rows)
    states = model.user_states(x[torch.as_tensor(inp_pos, device=device)], torch.as_tensor(mask, device=device))
    query = states[torch.as_tensor(mask, device=device)]  # [P, out]
    emb, want = _item_embeddings(model, x, uniq, r, np.concatenate([pos_rows, cand_rows]), si, device)
    pos = emb[torch.as_tensor(np.searchsorted(want, pos_rows), device=device)]
    cand = emb[torch.as_tensor(np.searchsorted(want, cand_rows), device=device)]
    pos_t, cand_t = torch.as_tensor(pos_rows, device=device), torch.as_tensor(cand_rows, device=device)
    if tc.loss == "bce":
        neg = cand.view(len(pos_rows), tc.bce_negatives, -1)
        return bce_loss(query, pos, neg, tc.temperature, (cand_t != pos_t.repeat_interleave(tc.bce_negatives))
                        .view(len(pos_rows), tc.bce_negatives))
    if tc.loss == "full_softmax":  # candidates = the pool in order; the target is its position there
        target = torch.as_tensor(np.searchsorted(si.neg_pool, pos_rows), device=device)
        return full_softmax_loss(query, cand, target, tc.temperature)
    use_q = tc.logq and si.logq is not None and tc.loss == "next_item"
    return next_item_loss(query, pos, pos_t, cand, cand_t, tc.temperature,
                          si.logq[pos_t] if use_q else None, si.logq[cand_t] if use_q else None)


# ==================================================================================================
# Training loop
# ==================================================================================================
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, total_steps: int, base: float, warmup: int, schedule: str = "cosine", floor: float = 0.1) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a ``total_steps`` schedule: a linear warm-up
    over ``warmup`` steps, then constant or a cosine decay to ``floor * base`` at ``total_steps``.

    A function of steps only, so the same run gives the same schedule on a busy or an idle machine (a
    wall-clock budget may stop a run early, it never changes its schedule).
    """
    warm = min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "constant":
        return base * warm
    progress = min(step / max(total_steps, 1), 1.0)
    return base * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def validate(model: PCH, cat: Catalogue, cases: Cases, ks, batch: int, device) -> dict[str, float]:
    """Validation Recall@K and NDCG@K of ``model`` on ``cases`` (the early-stopping signal), and the
    catalogue coverage of the top min(K) lists."""
    users, items = model_vectors(model, cat, cases, batch, device)
    ranked = rank_all(users, items, cases, max(ks), batch)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked.ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranked.ranks, k)
    out[f"coverage@{min(ks)}"] = coverage_at_k(ranked.topk, len(cat), min(ks))  # a collapse shows here first
    return out


def _warm_start(model: PCH, pcfg: PCHConfig, cat: Catalogue, warm_dir: Path) -> None:
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


def evidence_changed(cat: Catalogue, warm_dir: Path) -> np.ndarray:
    """Catalogue rows (with an ID row) whose training evidence differs from the warm start's: items that got
    training events since, or their first ones. A sparse update trains the ID rows of these items only."""
    vocab = pd.read_parquet(warm_dir / "items.parquet", columns=[S.ITEM_ID, S.POPULARITY])
    before = pd.Series(vocab[S.POPULARITY].to_numpy(np.int64), index=vocab[S.ITEM_ID].to_numpy())
    old = before.reindex(cat.item_ids, fill_value=-1).to_numpy()
    return np.flatnonzero((cat.item_idx > 0) & (old != cat.popularity))


def _freeze_but_rows(net: PCH, rows: np.ndarray) -> int:
    """Freeze every parameter but the ID embedding rows ``rows`` (ID vocab rows); returns how many rows train.

    The other rows' gradients are zeroed by a hook. AdamW keeps them exactly where they are: their moment
    estimates stay 0, and the ID table has no weight decay (see the optimiser's parameter groups)."""
    for p in net.parameters():
        p.requires_grad_(False)
    if not net.config.uses_ids or not len(rows):
        return 0
    weight = net.item_id.weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[torch.as_tensor(rows, device=weight.device)] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda g: g * mask)
    return int(len(rows))


def _catalogue(cfg: Settings, dataset: str, split: pd.DataFrame, needs_content: bool,
               embeddings: tuple[np.ndarray, np.ndarray] | None, fit: tuple[str, ...] = (S.TRAIN,)) -> Catalogue:
    """The training catalogue. Building it never encodes; with ``train.encode_missing`` (and the CEG store
    as the source) items missing from the store are encoded here first and the catalogue built again."""
    try:
        return training_catalogue(cfg, dataset, split, needs_content, embeddings, fit)
    except MissingContent as exc:
        if not (cfg.train.encode_missing and embeddings is None):
            raise
        log.info("encoding %d item(s) missing from the embedding store", len(exc.item_ids))
        encode_catalogue(cfg, dataset)
        return training_catalogue(cfg, dataset, split, needs_content, fit=fit)


def train_model(cfg: Settings, dataset: str, protocol: str = S.PROTOCOL_LOO, model: str | None = None,
                epochs: int | None = None, budget_s: float | None = None, warm_start: str | Path | None = None,
                embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                users: np.ndarray | None = None, update: str = "dense",
                validate_run: bool = True) -> dict[str, Any]:
    """Train one model kind on a dataset's split; write a complete run folder and return its summary.

    Settings come from :func:`learn_tasks.pch.kinds.resolve` (``configs/models/<kind>.yaml``, then
    ``train.per_model``). ``embeddings`` = (item ids, vectors) replaces the CEG store (tests, experiments);
    by default the current embedding version of ``dataset`` is read with
    :func:`learn_tasks.ceg.store.load_embeddings`. ``model`` defaults to ``pipeline.model``. ``users``
    limits the training sequences to those users (an incremental fine-tune of a warm start); the
    catalogue, its popularity and the validation cases stay those of the whole split. A ``warm_start``
    run validates once, after its last epoch (and keeps that epoch); ``validate_run=False`` skips that
    round (the caller scores the model itself, as the pipeline's promotion gate does).

    ``update="sparse"`` (with ``warm_start``) is the cheap daily update: the warm start's dense weights
    (content adaptor, transformer, projection) and content centring stay as they are, and only the ID
    embedding rows of items whose training evidence changed are trained (with their evidence weights). Every
    other item keeps its exact vector, so the serving index needs only those rows rewritten. A content-only
    model has no ID rows: its sparse update trains nothing and only takes the new item statistics.
    """
    # ``train.threads`` holds for this run only: every stage of a pipeline run shares one process, and
    # training's single thread must not slow down the evaluation that follows it.
    threads = torch.get_num_threads()
    try:
        return _train_model(cfg, dataset, protocol, model, epochs, budget_s, warm_start, embeddings, users, update,
                            validate_run)
    finally:
        torch.set_num_threads(threads)


def _train_model(cfg: Settings, dataset: str, protocol: str, model: str | None, epochs: int | None,
                 budget_s: float | None, warm_start: str | Path | None, embeddings: tuple[np.ndarray, np.ndarray] | None,
                 users: np.ndarray | None, update: str, validate_run: bool) -> dict[str, Any]:
    if update not in ("dense", "sparse"):
        raise ValueError(f"update must be 'dense' or 'sparse', got {update!r}")
    if update == "sparse" and not warm_start:
        raise ValueError("a sparse update needs a warm start (the model whose dense weights it keeps)")
    model = model or cfg.pipeline.model
    if model not in MODEL_KINDS:
        raise ValueError(f"cannot train {model!r}; trainable kinds are {MODEL_KINDS}")
    cfg = kinds.resolve(cfg, model)
    tc, mc = cfg.train, cfg.model
    epochs = epochs if epochs is not None else tc.epochs
    budget = budget_s if budget_s is not None else tc.budget_s
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    device = pick_device(tc.device)
    t_setup = time.perf_counter()

    split = load_split(cfg, dataset, protocol)
    fit = (S.TRAIN, S.VALID) if tc.fit_splits == "train_valid" else (S.TRAIN,)
    train_df = split[split[S.SPLIT].isin(fit)]
    cat = _catalogue(cfg, dataset, split, needs_content=model != "sasrec", embeddings=embeddings, fit=fit)
    ids, content, item_idx, pop, fp = cat.item_ids, cat.content, cat.item_idx, cat.popularity, cat.fingerprint
    seqs, skipped = build_sequences(train_df if users is None else
                                    train_df[train_df[S.USER_ID].isin(np.asarray(users, np.int64))], cat)
    if not len(seqs) and update == "sparse":
        epochs = 0  # no user with new evidence: nothing to train
    elif not len(seqs):
        raise ValueError(f"dataset {dataset!r} ({protocol}) has no training user with 2 or more events")
    if tc.fit_splits == "train_valid":  # a refit on everything before the test cut-off: no validation left
        val_cases = build_cases(split, cat, protocol, S.VALID).subset(np.zeros(0, np.int64))
    else:
        val_cases = sample_cases(build_cases(split, cat, protocol, S.VALID), tc.val_users, cfg.evaluate.seed)
    if not len(val_cases) and tc.fit_splits == "train":
        log.warning("no validation cases for %s/%s: no early stopping, the last epoch is kept", dataset, protocol)

    pcfg = PCHConfig(kind=model, item_tower=mc.item_tower, d_in=content.shape[1] if content is not None else 0,
                     d_model=mc.d_model, n_layers=mc.n_layers, n_heads=mc.n_heads, dropout=mc.dropout,
                     max_len=mc.max_len, out_dim=mc.out_dim, n_items=int(item_idx.max()), id_dropout=mc.id_dropout,
                     mix_k=mc.mix_k, similarity=mc.similarity, positions=mc.positions, block=mc.block)
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
    sparse_rows = None
    if update == "sparse":
        changed = evidence_changed(cat, Path(warm_start))
        sparse_rows = _freeze_but_rows(net, item_idx[changed])
        if not sparse_rows:
            epochs = 0  # nothing to train: the warm start with this catalogue's statistics
        log.info("sparse update: %d ID row(s) of items with new training evidence train, the rest is frozen",
                 sparse_rows)
    D.broadcast_module(net)  # data-parallel runs start from rank 0's weights (no-op in one process)
    # Uniform negatives come from the whole catalogue; an ID-only model has no representation of its own for
    # an item without training events (they all share the unknown row), so it draws from items with an ID.
    neg_pool = np.arange(len(ids)) if pcfg.uses_content else np.flatnonzero(item_idx > 0)
    si = StepInputs(
        torch.as_tensor(content, device=device) if content is not None else None,
        torch.as_tensor(item_idx, device=device),
        logq(pop, tc, len(neg_pool)).to(device) if tc.logq else None, len(ids), neg_pool)

    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "item_id" not in n and "pos" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "item_id" not in n and "pos" not in n)]
    groups = [g for g in ({"params": decay, "weight_decay": tc.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # No group at all only in a sparse update with no row to train, which runs no epoch (epochs = 0 above).
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98)) if groups else None
    steps_per_epoch = math.ceil(math.ceil(len(seqs) / tc.batch_size) / D.world_size())  # per rank
    total_steps = max(1, (tc.schedule_epochs or epochs) * steps_per_epoch)  # the schedule, in optimiser steps
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
        batches = (dense_batches(seqs, pcfg.max_len, tc.batch_size, tc.n_history, tc.n_target, rng, tc.length_buckets)
                   if tc.loss == "dense_all_action"
                   else next_item_batches(seqs, pcfg.max_len, tc.batch_size, rng, tc.length_buckets))
        nan = False
        for b in D.shard_batches(batches, rng):  # this rank's share (all batches in one process)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, tc.lr, warmup, tc.lr_schedule)
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
        # A warm-started fine-tune validates once, after its last epoch: the promotion gate scores it
        # anyway, and validating each of its few epochs costs about as much as training them.
        last = epoch == epochs or stopped == "budget"
        due = validate_run and len(val_cases) and (last if warm_start else (epoch % tc.val_every == 0 or last))
        val = validate(net, cat, val_cases, cfg.evaluate.ks, cfg.evaluate.batch_users, device) if due else {}
        n_seq = int(D.sum_across(n_seq))  # all ranks
        line = {"epoch": epoch, "step": step, "loss": D.mean_across(float(np.mean(losses)) if losses else float("nan")),
                "sequences_per_s": n_seq / max(epoch_time, 1e-9), "lr": opt.param_groups[0]["lr"],
                "elapsed_s": time.perf_counter() - t0, **{f"val_{k}": v for k, v in val.items()}}
        log_lines.append(line)
        log.info("epoch %d/%d loss %.4f  %.0f seq/s  %s  lr %.2e  %.0fs", epoch, epochs, line["loss"],
                 line["sequences_per_s"], "  ".join(f"{k} {v:.4f}" for k, v in val.items()), line["lr"],
                 line["elapsed_s"])
        metric = val.get(tc.early_stop_metric)
        if metric is None and len(val_cases) and validate_run:
            pass  # no validation round this epoch
        elif metric is None:
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
        "embedding_fingerprint": fp, "update": update, "sparse_rows": sparse_rows,
    }
    meta = {
        **summary, "created": created, "model_config": asdict(pcfg),
        "settings": {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "evaluate": cfg.evaluate.model_dump()},
        "slices": {"tail_share": cfg.evaluate.tail_share, "cold_user_max_events": cfg.evaluate.cold_user_max_events,
                   "long_tail_max_popularity": int(pop[tail_mask(pop, cfg.evaluate.tail_share)].max(initial=0))},
        "warm_start": str(warm_start) if warm_start else None,
    }
    if D.is_main():  # one writer in a data-parallel run
        with atomic_dir(run_dir) as tmp:
            save_checkpoint(net, pcfg, tmp)
            write_parquet(cat.vocab_frame(cfg.evaluate.tail_share), tmp / "items.parquet")
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(l) + "\n" for l in log_lines), encoding="utf-8")
            write_json(meta, tmp / registry.META)
        registry.publish_run(cfg, run_dir)  # a URL home: every host can list and load it
    D.barrier()
    log.info("saved %s (%s after %d epoch(s), best epoch %d)", run_dir, stopped, summary["epochs_run"], best_epoch)
    return summary
