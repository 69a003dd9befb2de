"""Training-free baselines. Each one gives, for a batch of evaluation cases, a score for every catalogue item.

* ``popular``: every user gets the same ranking, by the number of events known at the stage (the
  events before the cut-off under ``temporal``; every non-target event under ``loo``);
* ``recent_popular``: popularity over the ``evaluate.recent_days`` days before the case's reference time
  (the stage's cut-off under ``temporal``; the user's last history event under ``loo``), ties broken by
  popularity over everything known up to that time. Only events before the reference time count;
* ``item_knn``: item-item co-occurrence. Two items are similar when the same users interacted with both:
  cosine similarity of their user sets, |U_i & U_j| / sqrt(|U_i| |U_j|), each item keeping its
  ``evaluate.knn_neighbours`` most similar items; a user scores an item by the summed similarity of the
  last ``model.max_len`` items of their history to it (ties broken by popularity);
* ``content_knn``: the user is the mean of the content embeddings of their recent history (the same
  ``max_len`` window the neural models see), items are their content embeddings: nearest items by cosine.

The ID-based SASRec baseline is a trained model and lives in :mod:`learn_tasks.pch.model` (kind ``sasrec``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from scipy import sparse

DAY_S = 86_400
ScoreFn = Callable[[int, int], torch.Tensor]  # (lo, hi) -> a new [hi - lo, N] tensor: scores of cases lo..hi-1


def popular_vectors(popularity: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """One-dimensional vectors: users are 1, items are their known popularity."""
    return np.ones((n_users, 1), dtype=np.float32), np.asarray(popularity, dtype=np.float32)[:, None]


def content_knn_vectors(content: np.ndarray, hist_rows: np.ndarray, hist_offsets: np.ndarray,
                        max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Users: normalised mean of their last ``max_len`` history embeddings; items: normalised embeddings."""
    content = np.asarray(content, dtype=np.float32)
    items = content / np.maximum(np.linalg.norm(content, axis=1, keepdims=True), 1e-12)
    n = len(hist_offsets) - 1
    users = np.zeros((n, content.shape[1]), dtype=np.float32)
    for i in range(n):
        rows = hist_rows[hist_offsets[i]:hist_offsets[i + 1]][-max_len:]
        if len(rows):
            users[i] = items[rows].mean(0)
    users /= np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return users, items


def recent_popular_scores(event_rows: np.ndarray, event_times: np.ndarray, ref_times: np.ndarray, n_items: int,
                          days: float) -> ScoreFn:
    """Recent popularity of every item for each case.

    ``event_rows``/``event_times`` (unix seconds) are the known events; case i counts the events in
    ``[ref_times[i] - days, ref_times[i])`` (``days`` <= 0: every event before ``ref_times[i]``), plus a
    tie-break below 1 by every event before ``ref_times[i]``. ``ref_times`` must be sorted, and
    ``score(lo, hi)`` called with increasing ``lo``: one sweep through time updates the counts as it goes.
    """
    ref_times = np.asarray(ref_times, np.int64)
    if len(ref_times) and (np.diff(ref_times) < 0).any():
        raise ValueError("recent_popular_scores needs the cases in order of their reference time")
    by_time = np.argsort(event_times, kind="stable")
    rows, times = np.asarray(event_rows)[by_time], np.asarray(event_times, np.int64)[by_time]
    window = int(round(days * DAY_S)) if days > 0 else 2**62
    state = {"head": 0, "tail": 0, "recent": np.zeros(n_items, np.float64), "all": np.zeros(n_items, np.float64)}

    def advance(t: int) -> None:
        head = int(np.searchsorted(times, t, side="left"))  # events strictly before t
        tail = int(np.searchsorted(times, t - window, side="left"))  # events before the window
        np.add.at(state["recent"], rows[state["head"]:head], 1.0)
        np.add.at(state["all"], rows[state["head"]:head], 1.0)
        np.add.at(state["recent"], rows[state["tail"]:tail], -1.0)
        state["head"], state["tail"] = head, tail

    def score(lo: int, hi: int) -> torch.Tensor:
        out = np.empty((hi - lo, n_items), np.float32)
        last = None
        for j in range(lo, hi):
            t = int(ref_times[j])
            if t != last:
                advance(t)
                row = state["recent"] + state["all"] / (state["all"].max(initial=0.0) + 1.0)
                last = t
            out[j - lo] = row
        return torch.from_numpy(out)

    return score


def cooccurrence_neighbours(user_idx: np.ndarray, item_rows: np.ndarray, n_items: int,
                            neighbours: int) -> sparse.csr_matrix:
    """Item-item cosine similarity of user sets, each row keeping its ``neighbours`` largest entries.

    ``user_idx``/``item_rows`` are the known (user, item) events (repeats count once); the diagonal is 0.
    """
    from scipy import sparse  # here, not at the top: the pipeline's evaluation never needs it

    users = np.unique(user_idx, return_inverse=True)[1]
    x = sparse.csr_matrix((np.ones(len(users), np.float32), (users, item_rows)),
                          shape=(int(users.max(initial=-1)) + 1, n_items))
    x.data[:] = 1.0  # duplicates were summed: count each (user, item) once
    norm = np.sqrt(np.asarray(x.sum(0)).ravel())
    inv = np.where(norm > 0, 1.0 / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
    xn = x @ sparse.diags(inv)
    sim = (xn.T @ xn).tocsr()
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    # keep each row's top `neighbours`
    indptr, indices, data = sim.indptr, sim.indices, sim.data
    keep_rows, keep_cols, keep_vals = [], [], []
    for r in range(n_items):
        a, b = indptr[r], indptr[r + 1]
        if b == a:
            continue
        vals = data[a:b]
        top = np.argpartition(-vals, neighbours - 1)[:neighbours] if b - a > neighbours else np.arange(b - a)
        keep_rows.append(np.full(len(top), r))
        keep_cols.append(indices[a:b][top])
        keep_vals.append(vals[top])
    if not keep_rows:
        return sparse.csr_matrix((n_items, n_items), dtype=np.float32)
    return sparse.csr_matrix((np.concatenate(keep_vals), (np.concatenate(keep_rows), np.concatenate(keep_cols))),
                             shape=(n_items, n_items), dtype=np.float32)


def item_knn_scores(sim: sparse.csr_matrix, hist_rows: np.ndarray, hist_offsets: np.ndarray, max_len: int,
                    popularity: np.ndarray) -> ScoreFn:
    """Scores of cases lo..hi-1: summed similarity of each case's last ``max_len`` history items, plus a
    popularity tie-break far below any similarity difference."""
    pop = np.asarray(popularity, np.float64)
    tie = torch.as_tensor(1e-6 * pop / max(pop.max(initial=0.0), 1.0), dtype=torch.float32)
    from scipy import sparse

    def score(lo: int, hi: int) -> torch.Tensor:
        rows, cols = [], []
        for j, i in enumerate(range(lo, hi)):
            h = np.unique(hist_rows[hist_offsets[i]:hist_offsets[i + 1]][-max_len:])
            rows.append(np.full(len(h), j))
            cols.append(h)
        r, c = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, int), np.zeros(0, int))
        h = sparse.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(hi - lo, sim.shape[0]))
        return torch.from_numpy(np.asarray((h @ sim).todense(), dtype=np.float32)) + tie

    return score
