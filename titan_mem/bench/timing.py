"""How every peer benchmark times a case: one warm-up, then the median of `repeat` runs with min and max,
and ratios of medians from the same run (peer / ours: > 1 means ours is faster)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Median, min and max seconds of `fn()` over `repeat` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeat}


def ratio(peer: dict[str, float], ours: dict[str, float]) -> float:
    """Peer median / ours: > 1 when ours is faster."""
    return peer["median_s"] / ours["median_s"]
