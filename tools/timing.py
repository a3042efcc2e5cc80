"""Timing helpers shared by the `tools/bench_*.py` scripts."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_threads() -> int:
    """CPU cores this process may run on (respects `taskset`)."""
    return len(os.sched_getaffinity(0))
