"""Every path under ``LEARN_HOME`` (or under the local working directory of a URL home), named once.

:class:`Paths` is built by ``Settings.paths`` from the settings' local home, so no stage invents its own
layout; it only joins paths and never touches the file system.
"""
from __future__ import annotations

from pathlib import Path


class Paths:
    """The artifact layout under LEARN_HOME (see docs/configuration.md)."""

    def __init__(self, home: Path):
        self.home = home

    def dataset(self, name: str) -> Path:
        return self.home / "data" / name

    def dataset_splits(self, name: str) -> Path:
        """Cached splits of a prepared dataset (``<protocol>.parquet`` + ``.json``); removed on re-prepare."""
        return self.dataset(name) / "splits"

    def raw(self, name: str) -> Path:
        return self.home / "raw" / name

    def embeddings(self) -> Path:
        return self.home / "embeddings"

    def models(self) -> Path:
        return self.home / "models"

    def reports(self, kind: str) -> Path:
        return self.home / "reports" / kind

    def quarantine(self) -> Path:
        return self.home / "quarantine"

    def feast(self) -> Path:
        return self.home / "feast"

    def milvus(self) -> Path:
        return self.home / "milvus"

    def airflow(self) -> Path:
        return self.home / "airflow"

    def embedding_store(self, dataset: str) -> Path:
        """Every embedding version of a dataset (``<fingerprint>/`` folders and the ``CURRENT`` pointer)."""
        return self.embeddings() / dataset

    def dataset_models(self, dataset: str) -> Path:
        return self.models() / dataset

    def promoted(self, dataset: str) -> Path:
        """Files backend: the promoted run id of a dataset (one line, replaced atomically)."""
        return self.dataset_models(dataset) / "PROMOTED"

    def promotion_history(self, dataset: str) -> Path:
        """Files backend: every promotion of a dataset, one JSON line each, oldest first."""
        return self.dataset_models(dataset) / "promotions.jsonl"

    def pipeline_run(self, key: str) -> Path:
        """What each stage of one pipeline run recorded (``<stage>.json``)."""
        return self.home / "pipeline" / key

    def gate_sample(self, dataset: str) -> Path:
        """The promotion gate's fixed validation sample of a dataset and the scores cached on it."""
        return self.home / "pipeline" / "_gate" / dataset

    def incoming(self, dataset: str) -> Path:
        return self.home / "incoming" / dataset

    def landing(self, dataset: str, key: str) -> Path:
        return self.home / "landing" / dataset / key

    def quarantine_batch(self, dataset: str, key: str) -> Path:
        """Rows validation rejected from one batch (one pipeline run key) of a dataset."""
        return self.quarantine() / dataset / key

    def eval_reports(self, dataset: str) -> Path:
        """Evaluation reports of a dataset: ``<run or baseline>/<protocol>-<stage>/metrics.json`` and report."""
        return self.reports("eval") / dataset

    def locks(self) -> Path:
        return self.home / "locks"

    def new_items(self, dataset: str) -> Path:
        """Items added online (``POST /items``), kept until the next index version includes them."""
        return self.home / "serve" / dataset / "new_items"

    def release(self, dataset: str) -> Path:
        """Files backend: the dataset's current release (model run + collection the service serves), replaced
        atomically."""
        return self.home / "serve" / dataset / "release.json"

    def release_history(self, dataset: str) -> Path:
        """Files backend: every release of the dataset, one JSON line each, oldest first."""
        return self.home / "serve" / dataset / "releases.jsonl"

    def event_log(self) -> Path:
        """The embedded event log (SQLite, WAL): events, items added online, served recommendations."""
        return self.home / "eventlog" / "eventlog.db"

    def evidently(self) -> Path:
        return self.home / "evidently"

    def stack_run(self) -> Path:
        """Pid records, logs and the API token of the local stack (``learn up``)."""
        return self.home / "run"


# --------------------------------------------------------------------------------------------------
