"""bench/hygiene.py: the quiet-machine wait, other processes' CPU, the noisy flag, provenance, A B A B turns."""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH_SCRIPTS = ("encode", "serve", "pipeline", "load", "quality", "data_prepare", "features")


@pytest.fixture(scope="module")
def hygiene():
    spec = importlib.util.spec_from_file_location("bench_hygiene", REPO / "bench" / "hygiene.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


# ------------------------------------------------------------------------------------------ waiting
def test_wait_returns_at_once_on_a_quiet_machine(hygiene):
    clock = FakeClock()
    out = hygiene.wait_for_quiet(1.3, 600, load=lambda: 0.4, sleep=clock.sleep, clock=clock)
    assert out == {"quiet": True, "waited_s": 0.0, "load_avg_1m": 0.4}


def test_wait_until_the_load_falls(hygiene):
    clock = FakeClock()
    loads = iter([5.0, 3.0, 1.5, 1.2, 0.3])
    out = hygiene.wait_for_quiet(1.3, 600, poll_s=5, load=lambda: next(loads), sleep=clock.sleep, clock=clock)
    assert out["quiet"] and out["load_avg_1m"] == 1.2 and out["waited_s"] == 15.0


def test_wait_is_bounded_and_says_why(hygiene):
    clock, said = FakeClock(), []
    out = hygiene.wait_for_quiet(1.3, 60, poll_s=7, load=lambda: 4.0, sleep=clock.sleep, clock=clock, say=said.append)
    assert not out["quiet"] and out["waited_s"] == 60.0 and out["load_avg_1m"] == 4.0
    assert len(said) == 1 and "4.00" in said[0]


# ------------------------------------------------------------------------------------------ noisy
@pytest.mark.parametrize("load, share, noisy", [(0.5, 0.01, False), (1.3, 0.0, True), (0.2, 0.25, True),
                                                 (1.29, 0.10, False)])
def test_noisy_rule(hygiene, load, share, noisy):
    assert hygiene.is_noisy(load, share, max_load=1.3, max_other=0.10) is noisy


def test_other_cpu_is_the_machine_busy_time_minus_our_own(hygiene):
    s = hygiene.Snapshot
    before = s(wall=100.0, load_avg=(0.5, 0.5, 0.5), busy_s=1000.0, own_s=10.0)
    after = s(wall=110.0, load_avg=(1.5, 0.7, 0.6), busy_s=1016.0, own_s=22.0)
    out = hygiene.other_cpu(before, after, cpus=2)
    assert out == {"other_cpu_s": 4.0, "other_cpu_share": 0.2, "own_cpu_s": 12.0, "wall_s": 10.0}


def test_cpu_of_a_process_outside_our_tree_counts_as_other(hygiene, tmp_path: Path):
    """A busy process that is not ours (its parent exits at once, so init adopts it) shows up in
    other_cpu_s; the same work in our own child process does not."""
    burn = "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    done = tmp_path / "done"
    code = burn + f"open({str(done)!r}, 'w').close()\n"
    orphan = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True)"
    before = hygiene.Snapshot.take()
    subprocess.run([sys.executable, "-c", orphan], check=True)
    deadline = time.monotonic() + 120
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.exists()
    out = hygiene.other_cpu(before, hygiene.Snapshot.take())
    assert out["other_cpu_s"] >= 0.9  # the orphan burnt 1 s of CPU outside our tree
    # our own child's CPU is ours: waited for, it moves into children_user of this process
    own_before = hygiene.own_cpu_seconds()
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert hygiene.own_cpu_seconds() - own_before >= 0.9


def test_cpu_of_a_killed_childs_children_stays_ours(hygiene, tmp_path: Path):
    """SIGKILL of a child orphans its children; their CPU so far is counted by before_kill."""
    ready = tmp_path / "ready"
    burn = ("import time; t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            f"open({str(ready)!r}, 'w').close()\ntime.sleep(600)\n")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {burn!r}]); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        run = hygiene.Run()
        run.before_kill(child.pid)
        assert run.killed_own_s >= 0.45  # the grandchild's burnt half second
    finally:
        import psutil

        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------------------ provenance
def test_commit_and_command_line(hygiene):
    commit = hygiene.git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", commit["sha"]) and isinstance(commit["dirty"], bool)
    assert hygiene.command_line([str(REPO / "bench" / "encode.py"), "--quick", "--n", "1 000"]) == \
        "python bench/encode.py --quick --n '1 000'"


def test_a_run_records_every_hygiene_key(hygiene):
    args = argparse.Namespace(max_load=1000.0, wait_s=0.0, max_other_cpu=1e9)  # no machine state can make this run noisy
    run = hygiene.begin(args, say=lambda _: None)
    out = run.finish()
    assert set(out) == {"noisy", "load_avg", "commit", "command", "cpu", "hygiene"}
    assert out["noisy"] is False and out["load_avg"] == run.start.load_avg[0]
    assert {"load_avg_before", "load_avg_after", "other_cpu_s", "other_cpu_share", "wait", "why_noisy"} <= set(
        out["hygiene"])
    assert out["commit"] == hygiene.git_commit()["sha"] and out["hygiene"]["commit_at_end"] is None
    run.code = {"sha": "0" * 40, "dirty": False}  # the commit the run started from, not HEAD at its end
    moved = run.finish()
    assert moved["commit"] == "0" * 40 and moved["hygiene"]["commit_at_end"] == hygiene.git_commit()["sha"]
    strict = hygiene.begin(argparse.Namespace(max_load=0.0, wait_s=0.0, max_other_cpu=1.0), say=lambda _: None)
    res = strict.finish()  # no machine has a load average under 0
    assert res["noisy"] is True and "load average" in res["hygiene"]["why_noisy"][0]


# ------------------------------------------------------------------------------------------ A B A B
def test_interleave_takes_turns_and_reports_medians(hygiene):
    calls: list[str] = []
    clock = FakeClock()
    cost = {"a": [3.0, 1.0, 2.0], "b": [5.0, 4.0, 9.0]}

    def side(name: str):
        def fn():
            clock.now += cost[name][sum(c == name for c in calls)]
            calls.append(name)
            return f"{name}{len(calls)}"
        return fn

    out = hygiene.interleave({"a": side("a"), "b": side("b")}, rounds=3, clock=clock)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round
    assert out["a"]["seconds"] == [3.0, 1.0, 2.0] and out["a"]["median_s"] == 2.0
    assert out["b"]["median_s"] == 5.0 and out["b"]["result"] == "b6" and out["a"]["result"] == "a5"
    assert hygiene.per_second(10, out["a"]["seconds"]) == {"per_round": [3.3, 10.0, 5.0], "median": 5.0}


def test_interleave_needs_three_rounds(hygiene):
    with pytest.raises(ValueError, match="at least 3"):
        hygiene.interleave({"a": lambda: None, "b": lambda: None}, rounds=2)


# ------------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_every_benchmark_uses_the_hygiene_module(name: str):
    src = (REPO / "bench" / f"{name}.py").read_text(encoding="utf-8")
    assert "import hygiene" in src and "hygiene.add_arguments(ap)" in src
    assert "hygiene.begin(" in src and ".finish()" in src


def test_cpu_info_names_the_model_and_the_flags_that_matter(hygiene, tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n"
                 "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    assert hygiene.cpu_info(str(f)) == {"model": "AMD EPYC 9654", "flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert hygiene.cpu_info(str(tmp_path / "missing"))["flags"] is None
