"""PCH training losses: softmax over L2-normalised embeddings divided by a temperature.

* ``dense_all_action`` (LEARN / PinnerFormer): ``n_history`` user embeddings sampled from history positions
  x ``n_target`` items sampled from the target part of the sequence are all positives; negatives are the
  other users' targets in the batch (plus uniform catalogue items); a negative that is one of the user's
  own targets (an accidental hit) is masked out;
* ``next_item`` / ``sampled_softmax``: the user embedding at every position predicts the next item against
  a shared pool of candidates (:func:`next_item_loss`): in-batch positives plus uniform catalogue items
  (``next_item``, a sampled softmax with mixed negatives) or uniform items only (``sampled_softmax``);
* ``full_softmax``: the same prediction against every catalogue item (:func:`full_softmax_loss`);
* ``bce``: SASRec's original loss, binary cross-entropy of each position's next item against
  ``train.bce_negatives`` uniformly sampled negatives of that position (:func:`bce_loss`).

:func:`logq` gives the log of each candidate's expected count under the negative sampler; subtracting it
(``train.logq``) keeps popular items from being over-penalised.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


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


def full_softmax_loss(query: Tensor, items: Tensor, target: Tensor, temperature: float,
                      exclude: Tensor | None = None) -> Tensor:
    """Softmax over every item: query [P, D] x items [N, D]; ``target`` [P] rows of ``items``.

    ``exclude`` [N] (optional) marks rows that are never candidates (e.g. items without an ID of their own).
    Returns the mean cross-entropy over the P queries.
    """
    logits = query @ items.T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude[None, :], float("-inf"))
    return F.cross_entropy(logits, target)


def bce_loss(query: Tensor, pos: Tensor, neg: Tensor, temperature: float, neg_valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy: query [P, D] scores its positive pos [P, D] up and its own negatives neg [P, M, D]
    down. ``neg_valid`` [P, M] masks negatives that are accidental hits. As in SASRec, the positive and the
    negative terms are each averaged over their pairs and added."""
    pos_logit = (query * pos).sum(-1) / temperature  # [P]
    neg_logit = torch.einsum("pd,pmd->pm", query, neg) / temperature  # [P, M]
    pos_term = F.softplus(-pos_logit).mean()
    neg_loss = F.softplus(neg_logit)
    if neg_valid is None:
        return pos_term + neg_loss.mean()
    w = neg_valid.to(neg_loss.dtype)
    return pos_term + (neg_loss * w).sum() / w.sum().clamp(min=1)


def logq(pop: np.ndarray, tc, n_items: int) -> Tensor:
    """Log expected count of each item among one query's candidates: in-batch ~ popularity, random ~ uniform.

    ``pop`` [N] training popularity; ``tc`` the train settings (batch size, loss, negatives).
    """
    p = pop / max(pop.sum(), 1)
    in_batch = tc.loss in ("dense_all_action", "next_item")  # the other losses sample uniformly (or not at all)
    n_in = tc.batch_size * (tc.n_target if tc.loss == "dense_all_action" else 1) * in_batch
    expected = n_in * p + tc.n_random_negatives / n_items
    return torch.as_tensor(np.log(np.maximum(expected, 1e-12)), dtype=torch.float32)
