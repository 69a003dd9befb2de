"""bench/perf_tables.py: the performance tables of docs/results.md come from bench/results only."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("perf_tables", REPO / "bench" / "perf_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_block_shows_the_figures_and_their_provenance(perf, tmp_path: Path) -> None:
    (tmp_path / "serve.json").write_text(json.dumps({
        "workers": 2, "p50_ms": 2.0, "p95_ms": 3.0, "p99_ms": 5.04, "rps_c8": 661.6, "rps_c1": 390.0,
        "errors": 0, "c1": {"requests": 10}, "c8": {"requests": 20}, "new_item_misses": 0,
        "index_recall_at_10": 1.0, "index_type": "FLAT", "index_rows": 100,
        "noisy": True, "load_avg": 2.5, "commit": "abcdef1234", "command": "python bench/serve.py --quick",
        "hygiene": {"why_noisy": ["load average 2.5 >= 1.3 at the start"], "dirty": False}}))
    text = perf.render("serve", tmp_path)
    assert "| concurrency 1: p50 / p95 / p99 (target p99 <= 10 ms) | 2.00 / 3.00 / 5.04 ms" in text
    assert "662 requests/s" in text and "0 of 30 requests" in text
    assert "`python bench/serve.py --quick` at commit `abcdef1`" in text
    assert "**noisy**: load average 2.5 >= 1.3 at the start" in text


def test_files_without_hygiene_and_missing_files_say_so(perf, tmp_path: Path) -> None:
    (tmp_path / "load.json").write_text(json.dumps({"requests": 5, "errors": 0}))
    assert "predates the benchmark's hygiene keys" in perf.render("load", tmp_path)
    assert "Not measured yet: `bench/results/encode.json` is missing" in perf.render("encode", tmp_path)


def test_fill_replaces_only_the_blocks(perf, tmp_path: Path) -> None:
    (tmp_path / "loop_embedded.json").write_text(json.dumps({"lost": 0, "duplicated": 0, "noisy": False,
                                                             "load_avg": 0.5, "commit": "1234567x", "command": "c"}))
    page = f"intro\n{perf.begin('loop-embedded')}\nstale figures\n{perf.end('loop-embedded')}\noutro\n"
    out = perf.fill(page, tmp_path)
    assert out.startswith("intro\n") and out.endswith("outro\n") and "stale figures" not in out
    assert "| lost / duplicated (target 0 / 0) | 0 / 0 |" in out
    assert perf.fill(out, tmp_path) == out  # idempotent


def test_committed_results_page_matches_the_committed_json(perf) -> None:
    assert perf.main(["--check"]) == 0, "run: python bench/perf_tables.py"
