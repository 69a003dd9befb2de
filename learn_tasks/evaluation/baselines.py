"""Training-free baselines, expressed like every model: user vectors x item vectors, ranked by dot product.

* most-popular: every user gets the same ranking, by training interaction count;
* content-kNN: the user is the mean of the content embeddings of their recent history (the same
  ``max_len`` window the neural models see), items are their content embeddings: nearest items by cosine.

The ID-based SASRec baseline is a trained model and lives in :mod:`learn_tasks.pch.model` (kind ``sasrec``).
"""
from __future__ import annotations

import numpy as np


def popular_vectors(popularity: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """One-dimensional vectors: users are 1, items are their training popularity."""
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
