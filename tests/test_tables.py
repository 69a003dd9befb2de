"""bench/tables.py: quality tables from the benchmark's JSON, and the committed pages match the committed JSON."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def full_history() -> bool:
    """The pages mark results by the fixes their commit contains (bench/tables.py FIXES): git must know it."""
    import subprocess

    try:
        res = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return False
    return res.returncode == 0 and res.stdout.strip() == "false"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("bench_tables", REPO / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def row(value: float, cases: int = 100) -> dict:
    out = {"cases": cases}
    for k in (10, 50, 200):
        for name in ("recall", "ndcg"):
            v = value * (1 + k / 100) * (0.5 if name == "ndcg" else 1)
            out[f"{name}@{k}"] = v
            out[f"{name}@{k}_ci"] = [v - 0.01, v + 0.01]
    return out


def fake_result(dataset: str = "movielens-latest-small", mode: str = "quick") -> dict:
    models = {"learn": 0.05, "learn_hybrid": 0.08, "sasrec": 0.06, "popular": 0.02, "recent_popular": 0.03,
              "item_knn": 0.04, "content_knn": 0.01}
    proto = {m: {"all": row(v), "cold_start": row(v / 2, 10), "long_tail": row(v / 3, 20), "head": row(v, 70),
                 "cold_users": row(v, 5)} for m, v in models.items()}
    diff = lambda mean, lo, hi: {"mean": mean, "lo": lo, "hi": hi,  # noqa: E731
                                 "verdict": "better" if lo > 0 else "worse" if hi < 0 else "tie"}
    pairs = {f"learn_hybrid_vs_{o}": {s: {m: diff(0.02, 0.01, 0.03) if o == "sasrec" else diff(0.001, -0.01, 0.012)
                                          for m in ("recall@10", "ndcg@10", "recall@200")}
                                      for s in ("all", "cold_start")}
             for o in ("sasrec", "learn", "recent_popular")}
    chosen = {"learn": {"model.dropout": 0.1, "train.lr": 0.001}, "learn_hybrid": {"model.id_dropout": 0.3},
              "sasrec": {"train.loss": "bce"}}
    sel = {**{k: {"chosen": v} for k, v in chosen.items()},
           "recent_popular": {"setting": "evaluate.recent_days", "chosen": 30.0},
           "item_knn": {"setting": "evaluate.knn_neighbours", "chosen": 100},
           "mix_k": {"chosen": 10.0, "constraint_met": True}}
    return {
        "loo": proto, "temporal": copy.deepcopy(proto), "diffs": {"loo": pairs, "temporal": copy.deepcopy(pairs)},
        "coverage": {p: {m: {"coverage@10": 0.1 + v} for m, v in models.items()} for p in ("loo", "temporal")},
        "cold_pool": {"loo": {"test": 12, "items": 9742}, "temporal": {"test": 345, "items": 9742}},
        "users": {"loo": {"test": 300, "test_available": 610}, "temporal": {"test": 55, "test_available": 55}},
        "seeds": {"learn": [0, 1, 2], "learn_hybrid": [0, 1, 2], "sasrec": [0, 1, 2]},
        "selection": {"loo": sel, "temporal": sel},
        "final": {p: {k: {"runs": [{"best_epoch": e} for e in (3, 4, 4)]} for k in chosen} for p in ("loo", "temporal")},
        "meta": {"mode": mode, "dataset": dataset, "metric": "recall@200", "created": "2030-01-01T00:00:00+00:00",
                 "pairs": ["learn_hybrid_vs_sasrec", "learn_hybrid_vs_learn", "learn_hybrid_vs_recent_popular"], "patience": 10, "max_epochs": 4, "refit": True,
                 "plan": {"configs": 4, "eta": 2, "min_epochs": 1, "budget_epochs": 8,
                          "rungs": [{"candidates": 4, "epochs": 1}, {"candidates": 2, "epochs": 2}]}},
        "commit": "0123456789abcdef", "command": "python bench/quality.py --quick --dataset movielens-latest-small",
        "noisy": False, "load_avg": 0.4,
    }


def test_tables_show_every_model_both_protocols_intervals_coverage_and_ties(tables, tmp_path):
    (tmp_path / "quality_movielens_quick.json").write_text(json.dumps(fake_result()))
    (tmp_path / "quality_old.json").write_text(json.dumps({"loo": {"learn": {"all": {"recall@10": 0.1}}}, "meta": {}}))
    current, earlier = tables.load(tmp_path)
    assert [n for n, _ in current] == ["quality_movielens_quick.json"] and earlier == ["quality_old.json"]
    docs = tables.render_docs(current, earlier)
    for model in tables.MODELS:
        assert f"| {model} |" in docs
    assert "**loo**" in docs and "**temporal**" in docs and "quick smoke run" in docs
    assert "| learn_hybrid | 8.80 [7.80, 9.80] | 4.40 [3.40, 5.40]" in docs  # R@10 and N@10 with intervals, in %
    assert "| 18.00 |" in docs  # learn_hybrid's coverage@10
    assert "| loo | vs sasrec | all | +2.00 [+1.00, +3.00] better" in docs
    assert "| temporal | vs learn | cold-start | +0.10 [-1.00, +1.20] tie" in docs
    assert docs.index("| loo | vs sasrec | all") < docs.index("| loo | vs learn | all")  # the benchmark's order
    assert "Not tabulated: `bench/results/quality_old.json`" in docs
    assert "loo 12 of 9,742 items" in docs and "mix_k 10.0" in docs and "best epoch per seed 3, 4, 4" in docs
    readme = tables.render_readme(current, earlier)
    assert "| learn_hybrid | 8.80 [7.80, 9.80] | 4.40 [3.40, 5.40] | 8.80 [7.80, 9.80] | 4.40 [3.40, 5.40] | 18.00 / 18.00 |" in readme
    assert readme.count("| ") > 7 and "not a result" in readme
    assert "Cases: loo 300 test users (cold-start 10, long-tail 20 cases); temporal 55 test users" in readme


def test_full_runs_come_first_and_a_file_without_intervals_is_earlier(tables, tmp_path):
    (tmp_path / "quality_movielens_quick.json").write_text(json.dumps(fake_result()))
    (tmp_path / "quality_amazon_books.json").write_text(json.dumps(fake_result("amazon-books-2014-sample", "full")))
    broken = fake_result()
    del broken["loo"]["learn"]["all"]["recall@10_ci"]
    (tmp_path / "quality_x.json").write_text(json.dumps(broken))
    current, earlier = tables.load(tmp_path)
    assert [n for n, _ in current] == ["quality_amazon_books.json", "quality_movielens_quick.json"]
    assert earlier == ["quality_x.json"]
    assert "### Amazon Books 2014 sample, full run" in tables.render_docs(current, earlier)
    empty = tables.render_docs([], ["quality_amazon_books.json"])
    assert "No output of the current benchmark" in empty and "quality_amazon_books.json" in empty


def test_blocks_are_replaced_between_the_markers_only(tables):
    page = f"# Title\n\nbefore\n{tables.BEGIN}\nold\n{tables.END}\nafter\n"
    new = tables.replace_block(page, "new table\n", "page.md")
    assert new == f"# Title\n\nbefore\n{tables.BEGIN}\nnew table\n{tables.END}\nafter\n"
    assert tables.replace_block(new, "new table\n", "page.md") == new  # idempotent
    with pytest.raises(ValueError, match="page.md: needs exactly one"):
        tables.replace_block("# no markers\n", "x\n", "page.md")
    with pytest.raises(ValueError, match="needs exactly one"):
        tables.replace_block(page + page, "x\n", "page.md")


@pytest.mark.skipif(not full_history(), reason="needs the repository's git history")
def test_committed_pages_match_the_committed_json(tables):
    pages = tables.generate()
    for path, text in pages.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(REPO)} is stale: run python bench/tables.py"
    assert tables.main(["--check"]) == 0


def test_a_full_run_says_where_the_default_stands_only_as_far_as_intervals_go(tables, tmp_path):
    data = fake_result(mode="full")
    data["loo"]["item_knn"]["all"] = row(0.2)  # interval wholly above the default's: unpaired, still a loss
    data["loo"]["popular"]["all"] = row(0.078)  # overlapping intervals: a tie, whatever the means say
    (tmp_path / "quality_movielens.json").write_text(json.dumps(data))
    readme = tables.render_readme(*tables.load(tmp_path))
    loo = next(line for line in readme.splitlines() if line.startswith("* loo R@10:"))
    words = ("better than", "worse than", "tie with", "not distinguished from")
    found = {}
    rest = loo.split(": ", 1)[1].rstrip(".")
    for chunk in rest.split("; "):
        w = next(w for w in words if chunk.startswith(w))
        found[w] = chunk[len(w) + 1:].split(", ")
    assert "sasrec (all)" in found["better than"] and "sasrec (cold-start)" in found["better than"]  # paired
    assert "content_knn (all)" in found["better than"]  # 0.011 +- 0.01 lies wholly below 0.088 +- 0.01
    assert found["worse than"] == ["item_knn (all)"]
    assert "learn (all)" in found["tie with"] and "recent_popular (cold-start)" in found["tie with"]  # paired ties
    assert "popular (all)" in found["not distinguished from"]  # unpaired and overlapping: no claim either way
    assert not any("head" in x or "cold users" in x for v in found.values() for x in v)  # not the claims' slices
    assert "* temporal R@200:" in readme and "not a result" not in readme
    quick = tables.render_readme(*tables.load(_only(tmp_path, fake_result(), "quality_movielens_quick.json")))
    assert "stands" not in quick  # a smoke run makes no claim


def _only(tmp_path, data: dict, name: str):
    out = tmp_path / "quick"
    out.mkdir()
    (out / name).write_text(json.dumps(data))
    return out


def test_a_run_cut_short_shows_the_protocols_it_finished_and_says_it_is_partial(tables, tmp_path):
    data = fake_result(mode="full")
    for key in ("diffs", "coverage", "cold_pool", "users", "selection", "final"):
        data[key].pop("temporal")
    del data["temporal"]
    data["complete"] = False
    data["meta"].update(protocols=["loo", "temporal"], protocols_done=["loo"])
    (tmp_path / "quality_movielens.json").write_text(json.dumps(data))
    current, earlier = tables.load(tmp_path)
    assert [n for n, _ in current] == ["quality_movielens.json"] and not earlier
    docs = tables.render_docs(current, earlier)
    assert "full run (partial: loo of loo, temporal)" in docs
    assert "**loo**" in docs and "**temporal**" not in docs
    readme = tables.render_readme(current, earlier)
    assert "(partial: loo of loo, temporal)" in readme and "temporal R@10" not in readme


@pytest.mark.skipif(not full_history(), reason="needs the repository's git history")
def test_figures_written_before_a_fix_are_marked_stale_and_make_no_claim(tables, tmp_path):
    fix = tables.FIXES[0]
    data = fake_result(mode="full")
    data["commit"] = f"{fix['commit']}~1"  # the commit before the fix
    (tmp_path / "quality_movielens.json").write_text(json.dumps(data))
    current, earlier = tables.load(tmp_path)
    readme, docs = tables.render_readme(current, earlier), tables.render_docs(current, earlier)
    for model in fix["models"]:
        assert f"| {model} (stale) |" in readme and f"| {model} (stale) |" in docs
        assert f"vs {model} (stale)" in docs
        claims = [line for line in readme.splitlines() if line.startswith("* ")]
        assert claims and not any(model in line for line in claims)
        assert f"Left out: {model}" in readme
    assert f"written before commit `{fix['commit'][:7]}`" in readme
    data["commit"] = fix["commit"]  # written by the fixed code: nothing stale
    (tmp_path / "quality_movielens.json").write_text(json.dumps(data))
    readme = tables.render_readme(*tables.load(tmp_path))
    assert "(stale)" not in readme and "Stale:" not in readme


def test_without_git_history_the_creation_time_decides(tables, tmp_path):
    fix = tables.FIXES[0]
    data = fake_result(mode="full")
    data["commit"] = "f" * 40  # a commit git does not know (a shallow clone, a copied file)

    def readme_of(created):
        data["meta"]["created"] = created
        (tmp_path / "quality_movielens.json").write_text(json.dumps(data))
        return tables.render_readme(*tables.load(tmp_path))

    assert "(stale)" not in readme_of("2030-01-01T00:00:00+00:00")  # written after the fix
    assert f"written before commit `{fix['commit'][:7]}`" in readme_of("2020-01-01T00:00:00+00:00")
    unknown = readme_of(None)  # nothing places it after the fix: no claim may rest on it
    assert f"not known to contain commit `{fix['commit'][:7]}`" in unknown and "(stale)" in unknown
