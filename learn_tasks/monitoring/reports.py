"""Evidently reports of a monitoring run: one per section, plus the one-row summary the dashboard reads.

* ``interactions`` / ``users``: shares per slice and Wasserstein drift against the reference window.
* ``content``: the classifier embedding-drift score of new items against the catalogue
  (:func:`embedding_drift`) and where new items sit along the catalogue's principal directions.
* ``summary``: every monitored value, each threshold as an Evidently test on it.

Evidently is imported inside the functions (a heavy library); :func:`evidently_env` keeps it offline.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from learn_tasks.config import MonitorConfig

SUMMARY_TAG = "summary"  # tag of the summary snapshot; the dashboard's panels read it


def evidently_env() -> None:
    """Evidently reports anonymous usage unless told not to; nothing here may reach the network."""
    os.environ.setdefault("DO_NOT_TRACK", "1")


def evidently_dataset(df: pd.DataFrame, embeddings: dict[str, list[str]] | None = None):
    """An Evidently ``Dataset`` of ``df`` with every column numerical."""
    from evidently import DataDefinition, Dataset

    return Dataset.from_pandas(df, data_definition=DataDefinition(numerical_columns=list(df.columns),
                                                                  embeddings=embeddings))


def snapshot_values(snapshot) -> dict[str, float]:
    """``{metric display key: value}`` of a snapshot's single-value metrics, keyed as the section names them."""
    out = {}
    for m in snapshot.dict()["metrics"]:
        out[m["metric_name"]] = m["value"]
    return out


def drift_name(values: dict[str, Any], column: str) -> str | None:
    """The key of ``column``'s ``ValueDrift`` in :func:`snapshot_values`, or None when it was not measured."""
    return next((k for k in values if k.startswith(f"ValueDrift(column={column},")), None)


def interactions_report(mc: MonitorConfig, warm: bool = True, drift: bool = True):
    """Event shares per slice; with ``warm`` the long-tail / head shares, with ``drift`` popularity drift."""
    from evidently import Report
    from evidently.metrics import MeanValue, QuantileValue, RowCount, ValueDrift

    metrics = [RowCount(), MeanValue(column="is_cold_start")]
    if warm:
        metrics += [MeanValue(column="is_long_tail"), MeanValue(column="is_head"),
                    QuantileValue(column="log_popularity", quantile=0.5),
                    QuantileValue(column="log_popularity", quantile=0.9)]
    if warm and drift:
        metrics.append(ValueDrift(column="log_popularity", method="wasserstein", threshold=mc.popularity_drift_max))
    return Report(metrics)


def users_report(mc: MonitorConfig, drift: bool = True):
    """New / cold user shares and activity; with ``drift`` its drift against the training window's end."""
    from evidently import Report
    from evidently.metrics import MeanValue, QuantileValue, RowCount, ValueDrift

    metrics = [RowCount(), MeanValue(column="is_new_user"), MeanValue(column="is_cold_user"),
               MeanValue(column="events_in_window"), QuantileValue(column="sequence_length", quantile=0.5)]
    if drift:
        metrics += [
            ValueDrift(column="events_in_window", method="wasserstein", threshold=mc.activity_drift_max),
            ValueDrift(column="sequence_length", method="wasserstein", threshold=mc.sequence_length_drift_max)]
    return Report(metrics)


def embedding_drift(cur: pd.DataFrame, ref: pd.DataFrame, mc: MonitorConfig) -> float:
    """Evidently's classifier embedding-drift method: ROC AUC of a model telling ``cur`` rows from ``ref`` rows.

    Called directly rather than through the ``EmbeddingsDrift`` report metric, whose t-SNE picture costs
    minutes on two cores even for a few hundred items; the score is the same computation.
    """
    from evidently.metrics.embeddings import ModelDriftMethod

    method = ModelDriftMethod(threshold=mc.embedding_drift_max if mc.embedding_drift_max is not None else 0.55,
                              pca_components=mc.embedding_pca_components or None)
    score, _, _ = method(cur.copy(), ref.copy())  # the method adds a label column to its inputs
    return float(score)


def principal_components(cur: np.ndarray, ref: np.ndarray, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sets projected on the catalogue's (reference's) leading ``n`` principal directions."""
    mean = ref.mean(axis=0)
    # The eigenvectors of the d x d covariance are the right singular vectors of the centred catalogue,
    # at a fraction of the cost of its SVD (tens of thousands of rows, a few hundred dimensions).
    centred = np.asarray(ref - mean, np.float64)
    w, v = np.linalg.eigh(centred.T @ centred)
    basis = v[:, np.argsort(-w, kind="stable")][:, : max(1, min(n, len(w), len(ref)))]
    basis = basis * np.where(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])] < 0, -1.0, 1.0)
    cols = [f"pc{i + 1}" for i in range(basis.shape[1])]
    return (pd.DataFrame((cur - mean) @ basis, columns=cols), pd.DataFrame((ref - mean) @ basis, columns=cols))


def content_report(columns: Sequence[str]):
    """Where new items sit along the catalogue's main content directions (one drift widget per component)."""
    from evidently import Report
    from evidently.metrics import MeanValue, RowCount, ValueDrift

    return Report([RowCount(), MeanValue(column="embedding_drift")]
                  + [ValueDrift(column=c, method="wasserstein") for c in columns])


def summary_report(values: dict[str, float], limits: dict[str, float]):
    """One row with every value and threshold; thresholds are tests on the values (pass/fail in the UI)."""
    from evidently import Report
    from evidently.metrics import MeanValue
    from evidently.tests import gte, lte

    metrics = []
    for key in sorted(values):
        tests = []
        for kind, make in (("max", lte), ("min", gte)):
            if f"{key}.{kind}" in limits:
                tests.append(make(limits[f"{key}.{kind}"]))
        metrics.append(MeanValue(column=key, tests=tests or None))
    for key in sorted(limits):
        metrics.append(MeanValue(column=key))
    row = {**{k: [float(v)] for k, v in values.items()}, **{k: [float(v)] for k, v in limits.items()}}
    return Report(metrics), pd.DataFrame(row)
