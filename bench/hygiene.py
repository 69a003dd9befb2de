"""Benchmark hygiene shared by the ``bench/`` scripts: a quiet machine, other processes' CPU, provenance.

A figure measured while other jobs run says little about the code measured, so every benchmark

1. waits (bounded, ``--wait-s``) until the machine is quiet: the 1-minute load average under
   ``--max-load`` (default 1.3);
2. records the load average and the CPU seconds that *other* processes used while it ran: the
   machine's busy CPU time (``psutil.cpu_times``) minus this process tree's own (this process, its
   live children and the children it has waited for);
3. marks its result ``"noisy": true`` when the machine was not quiet at the start, or when other
   processes used more than ``--max-other-cpu`` (default 0.10) of the machine's CPU capacity during
   the run;
4. records the git commit (and whether the work tree had uncommitted changes) and the command line.

:func:`interleave` runs the sides of a comparison in turns (A B A B ..., the order rotating every
round) for at least three rounds, so a change in load hits every side alike, and reports each side's
median.

Usage in a script::

    hygiene.add_arguments(ap)                      # --max-load, --wait-s, --max-other-cpu
    run = hygiene.begin(args)                      # waits for a quiet machine, takes the first snapshot
    ...                                            # the measured work
    result.update(run.finish())                    # noisy, load_avg, commit, command, hygiene

The keys every result gets: ``noisy`` (bool), ``load_avg`` (1-minute load average when the measured
work started), ``commit``, ``command`` and ``hygiene`` (the details: load averages before and after,
other processes' CPU seconds and share, the wait).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

REPO = Path(__file__).resolve().parent.parent
MAX_LOAD = 1.3  # 1-minute load average under which a machine counts as quiet
MAX_OTHER_CPU = 0.10  # share of the machine's CPU capacity other processes may use during a clean run
WAIT_S = 600.0  # longest wait for a quiet machine
MIN_ROUNDS = 3

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- snapshots
def own_cpu_seconds(proc: Any | None = None) -> float:
    """CPU seconds (user + system) of this process tree: this process, its live descendants, and the
    ended children that each of them has waited for (a waited child's time moves to its parent)."""
    import psutil

    proc = proc or psutil.Process()
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # ended in between: its time shows up in its parent's children_* once waited for
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process) since boot; in a virtual
    machine this includes steal, the time the host gave to other machines, which slows a benchmark too."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(getattr(t, f) for f in t._fields if f not in ("guest", "guest_nice"))  # guest is in user
    return total - idle


@dataclass(frozen=True)
class Snapshot:
    """The machine at one moment: wall clock, load averages, busy CPU seconds, this tree's CPU seconds."""

    wall: float
    load_avg: tuple[float, float, float]
    busy_s: float
    own_s: float

    @classmethod
    def take(cls) -> "Snapshot":
        return cls(time.monotonic(), tuple(round(x, 2) for x in os.getloadavg()), machine_busy_seconds(),
                   own_cpu_seconds())


def other_cpu(before: Snapshot, after: Snapshot, cpus: int | None = None) -> dict[str, float]:
    """CPU seconds other processes used between two snapshots, and their share of the machine's capacity."""
    cpus = cpus or os.cpu_count() or 1
    wall = max(after.wall - before.wall, 1e-9)
    other = max((after.busy_s - before.busy_s) - (after.own_s - before.own_s), 0.0)
    return {"other_cpu_s": round(other, 3), "other_cpu_share": round(other / (wall * cpus), 4),
            "own_cpu_s": round(after.own_s - before.own_s, 3), "wall_s": round(wall, 3)}


def is_noisy(load_before: float, other_share: float, max_load: float = MAX_LOAD,
             max_other: float = MAX_OTHER_CPU) -> bool:
    """A run is noisy when the machine was busy at its start or other processes used CPU during it."""
    return load_before >= max_load or other_share > max_other


# ------------------------------------------------------------------------------------------- waiting
def wait_for_quiet(max_load: float = MAX_LOAD, timeout_s: float = WAIT_S, poll_s: float = 5.0,
                   load: Callable[[], float] = lambda: os.getloadavg()[0],
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic,
                   say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Wait until the 1-minute load average is under ``max_load``, at most ``timeout_s`` seconds.

    Returns ``{"quiet": bool, "waited_s": float, "load_avg_1m": float}`` (the last load read).
    """
    start = clock()
    current = load()
    told = False
    while current >= max_load and clock() - start < timeout_s:
        if say is not None and not told:
            say(f"waiting up to {timeout_s:.0f} s for a quiet machine (load average {current:.2f} >= {max_load})")
            told = True
        sleep(min(poll_s, max(timeout_s - (clock() - start), 0.0)))
        current = load()
    return {"quiet": current < max_load, "waited_s": round(clock() - start, 1), "load_avg_1m": round(current, 2)}


# ------------------------------------------------------------------------------------------- provenance
def git_commit(repo: Path = REPO) -> dict[str, Any]:
    """``{"sha": HEAD or None, "dirty": uncommitted changes to tracked files or None}``."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this benchmark, as one shell-quoted line (``python bench/x.py --quick``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
        except ValueError:
            pass
    return shlex.join(["python", *argv])


# ------------------------------------------------------------------------------------------- a run
@dataclass
class Run:
    """One benchmark run: the wait, the first snapshot and the thresholds; :meth:`finish` adds the rest."""

    max_load: float = MAX_LOAD
    max_other: float = MAX_OTHER_CPU
    wait: dict[str, Any] = field(default_factory=dict)
    start: Snapshot = field(default_factory=Snapshot.take)
    killed_own_s: float = 0.0  # CPU of descendants of processes this run killed, which no one waits for
    # The code that runs is the code at the start: a long run records that commit, not HEAD at its end.
    code: dict[str, Any] = field(default_factory=git_commit)

    def before_kill(self, pid: int) -> None:
        """Call just before SIGKILL of our child ``pid``: its own CPU time reaches us when we wait for it,
        but its children's never will (they are orphaned, not waited for by it), so count it now."""
        import psutil

        try:
            doomed = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        for p in doomed:
            try:
                t = p.cpu_times()
                self.killed_own_s += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass

    def finish(self) -> dict[str, Any]:
        """The hygiene keys of the result: noisy, load_avg, commit, command, hygiene."""
        end = Snapshot.take()
        end = Snapshot(end.wall, end.load_avg, end.busy_s, end.own_s + self.killed_own_s)
        others = other_cpu(self.start, end)
        load_before = self.start.load_avg[0]
        noisy = is_noisy(load_before, others["other_cpu_share"], self.max_load, self.max_other)
        commit, at_end = self.code, git_commit()
        return {
            "noisy": noisy, "load_avg": load_before, "commit": commit["sha"], "command": command_line(),
            "cpu": cpu_info(),
            "hygiene": {
                "load_avg_before": list(self.start.load_avg), "load_avg_after": list(end.load_avg),
                **others, "cpu_count": os.cpu_count(), "max_load": self.max_load,
                "max_other_cpu_share": self.max_other, "wait": self.wait, "dirty": commit["dirty"],
                # HEAD moved while it ran (modules imported later may come from the newer code)
                "commit_at_end": at_end["sha"] if at_end["sha"] != commit["sha"] else None,
                "why_noisy": ([f"load average {load_before} >= {self.max_load} at the start"]
                              if load_before >= self.max_load else [])
                + ([f"other processes used {others['other_cpu_share']:.1%} of the CPU"]
                   if others["other_cpu_share"] > self.max_other else []),
                "note": "load_avg: 1-minute load average when the measured work started; the load after "
                        "includes this benchmark's own threads, other_cpu_s excludes them",
            },
        }


# Instruction sets that change CPU timings by large factors (bf16/int8 kernels, vector width).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The processor a result was measured on: its model name and which of ``CPU_FLAGS`` it has. The same
    code can differ 2-3x between two x86 CPUs (AVX2 only vs AVX-512 with bf16), so a figure needs it."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"model": platform.processor() or None, "flags": None}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The hygiene options every benchmark takes."""
    g = ap.add_argument_group("benchmark hygiene")
    g.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help=f"quiet = 1-minute load average under this (default {MAX_LOAD})")
    g.add_argument("--wait-s", type=float, default=WAIT_S,
                   help=f"longest wait for a quiet machine before running anyway, marked noisy (default {WAIT_S:.0f})")
    g.add_argument("--max-other-cpu", type=float, default=MAX_OTHER_CPU,
                   help="share of the machine's CPU other processes may use during a clean run "
                        f"(default {MAX_OTHER_CPU})")


def begin(args: argparse.Namespace | None = None, say: Callable[[str], None] | None = None) -> Run:
    """Wait (bounded) for a quiet machine, then take the first snapshot."""
    max_load = getattr(args, "max_load", MAX_LOAD)
    wait_s = getattr(args, "wait_s", WAIT_S)
    max_other = getattr(args, "max_other_cpu", MAX_OTHER_CPU)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    waited = wait_for_quiet(max_load, wait_s, say=say)
    if not waited["quiet"]:
        say(f"machine still busy (load average {waited['load_avg_1m']}): the result will be marked noisy")
    return Run(max_load=max_load, max_other=max_other, wait=waited)


# ------------------------------------------------------------------------------------------- A B A B
def interleave(sides: Mapping[str, Callable[[], T]], rounds: int = MIN_ROUNDS,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Run every side once per round, in turns (A B C, then B C A, ...), for ``rounds`` >= 3 rounds.

    Returns per side ``{"seconds": [per round], "median_s": ..., "result": its last return value}``.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"an interleaved comparison needs at least {MIN_ROUNDS} rounds, got {rounds}")
    if not sides:
        raise ValueError("nothing to compare")
    names = list(sides)
    out: dict[str, dict[str, Any]] = {n: {"seconds": [], "result": None} for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            res = sides[name]()
            out[name]["seconds"].append(clock() - t0)
            out[name]["result"] = res
    for name in names:
        out[name]["median_s"] = statistics.median(out[name]["seconds"])
    return out


def per_second(n: float, seconds: Sequence[float]) -> dict[str, Any]:
    """Items/s of each round and their median."""
    rates = [n / max(s, 1e-12) for s in seconds]
    return {"per_round": [round(x, 1) for x in rates], "median": round(statistics.median(rates), 1)}


# ------------------------------------------------------------------------------- small shared helpers
def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout stays for results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of ``values`` (None when there are none)."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
