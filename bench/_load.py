"""Machine load around a benchmark: the load average before and after, and whether the result is noisy.

A timing taken while other jobs run says little (two cores shared with a test suite can double a run), so
every result records the 1-minute load average at its start and end and is flagged ``"noisy": true`` when
either was above ``NOISY_LOAD`` (1.3 on any machine: one busy core besides the benchmark already shows).
"""
from __future__ import annotations

import os
from typing import Any

NOISY_LOAD = 1.3


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


class LoadWatch:
    """``w = LoadWatch()`` before the measurement, ``w.result()`` after: ``load_avg`` and ``noisy``."""

    def __init__(self) -> None:
        self.before = load_now()

    def result(self) -> dict[str, Any]:
        after = load_now()
        return {"load_avg": {"before": self.before, "after": after, "max": max(self.before, after)},
                "noisy": max(self.before, after) > NOISY_LOAD}
