"""Interleaved timing: every step of a row once per round, medians over rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def interleaved(
    steps: Mapping[str, Callable[[], None]],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each call of each step: one untimed call each, then
    ``rounds`` rounds of one timed call each.

    Interleaved, the steps share the machine's load as it changes, so their
    ratios hold on a noisy machine; the order reverses every other round, so
    that no step always follows the same one (whose writes may still be
    leaving the caches).
    """
    names = list(steps)
    for name in names:
        steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            start = clock()
            steps[name]()
            seconds[name].append(clock() - start)
    return seconds


def median_ms(seconds: Sequence[float]) -> float:
    """The median of ``seconds``, in milliseconds."""
    return 1e3 * statistics.median(seconds)
