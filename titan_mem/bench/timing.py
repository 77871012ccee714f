"""How every peer benchmark times a case: one warm-up, then the median of `repeat` runs with min and max,
and ratios of medians from the same run (peer / ours: > 1 means ours is faster). Sides being compared are
timed interleaved, in a rotating order: on a shared VM the first of two back-to-back measurements ran up to
12 % slower (SmolLM2 full finetuning, peer first: 8,107 ms, then ours 7,092, peer 7,236, ours 7,239)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def timed_interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Seconds of each function: one warm-up each, then `repeat` rounds that run every function once, the
    order rotating each round, so drift in the machine's state falls on all of them alike. On CUDA each run
    is timed to its kernels' end (synchronised before and after)."""
    names = list(fns)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": repeat}
        for name, t in times.items()
    }


def ratio(peer: dict[str, float], ours: dict[str, float]) -> float:
    """Peer median / ours: > 1 when ours is faster."""
    return peer["median_s"] / ours["median_s"]


def rates(times: dict[str, dict[str, float]], amount: float, unit: str) -> dict[str, Any]:
    """Ours vs the peer from `timed_interleaved`'s {"ours", "peer"}: both timings, `amount` per second of
    each (`unit`: "tokens", "items") and the ratio."""
    ours, peer = times["ours"], times["peer"]
    return {
        "ours": ours,
        "peer": peer,
        f"ours_{unit}_per_s": amount / ours["median_s"],
        f"peer_{unit}_per_s": amount / peer["median_s"],
        "ratio": ratio(peer, ours),
    }
