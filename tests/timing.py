"""Timing for the benchmarks: the contenders take turns, round after round, in one process.

Other processes on the machine and its memory speed change from second to second; timed one
after the other, two implementations would each meet a different machine. Interleaved, each
round meets both with the same one, and the best (or median) of the rounds is compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds each call of each run took: `rounds` rounds, each calling every run once, in
    order; first one untimed call of each (caches, thread pools, compilation) unless warm_up
    is False."""
    if warm_up:
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def best(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: min(t) for name, t in times.items()}


def median(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in seconds: for one contender timed alone (a part of a
    step, say), never for comparing two."""
    return min(interleaved({"": fn}, repeats, warm_up=False)[""])
