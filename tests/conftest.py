"""Shared fixtures: an isolated LEARN_HOME per test and small generated datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every library offline and quiet: nothing may reach a model hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from learn_tasks.data import datasets as data  # noqa: E402
from learn_tasks.data import synth  # noqa: E402
from learn_tasks.config import Settings, load_settings  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings whose LEARN_HOME is a fresh temporary folder."""
    home = tmp_path / "learn_home"
    monkeypatch.setenv("LEARN_HOME", str(home))
    return load_settings()


@pytest.fixture
def synth_dataset(settings: Settings, tmp_path: Path) -> str:
    """A small generated dataset, prepared as 'synth' under the test's LEARN_HOME."""
    src = synth.write_seqrec(tmp_path / "synth_src", synth.SynthSpec(n_users=200, n_items=300))
    data.prepare_dataset(settings, "seqrec", src, "synth")
    return "synth"
