"""Learning vs forgetting: each finetuning run is a point (how much it learned, how much it forgot), each
method a sweep of points, and methods are compared at *matched learning* (docs/design.md, "The study"; Lin et
al. 2025 compare forgetting at similar learning levels).

* learning = improvement of a metric over the base (e.g. taught-fact F1 up, or answer NLL down);
* forgetting = relative worsening of a held-out metric over the base (0 = none, 0.11 = 11 % worse);
* a method's Pareto front = its points that no other point of the method beats on both (more learning and
  less forgetting); forgetting at a learning level = linear interpolation along the front, sorted by
  learning, undefined outside the learning range the front covers (no extrapolation).

The interpolation is kept as weights on the front's points (`interpolation`): the front is chosen once (on
validation forgetting), and every bootstrap replicate re-reads *test* forgetting at the same points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One evaluation point of a finetuning run on the learning-forgetting plane."""

    learning: float
    forgetting: float
    label: str = ""


def learning_gain(base: float, value: float, higher_is_better: bool) -> float:
    """How far a metric moved in its good direction (same units as the metric)."""
    return value - base if higher_is_better else base - value


def relative_forgetting(base: float, value: float, higher_is_better: bool) -> float:
    """Relative worsening of a held-out metric: (base - value) / |base| for scores (F1 dropping), (value -
    base) / |base| for losses (NLL rising). Negative = the metric improved. A zero base has no scale."""
    if base == 0:
        raise ValueError("relative forgetting: the base value is 0 (no scale to measure against)")
    worse = base - value if higher_is_better else value - base
    return worse / abs(base)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points, sorted by learning: a point is dominated when another has at least as
    much learning and at most as much forgetting, and is strictly better in one."""
    pts = sorted(points, key=lambda p: (-p.learning, p.forgetting))
    front: list[Point] = []
    best_forgetting = math.inf
    for p in pts:  # most learning first: keep a point only if it forgets less than all that learned more
        if p.forgetting < best_forgetting:
            front.append(p)
            best_forgetting = p.forgetting
    return sorted(front, key=lambda p: p.learning)


def anchored_front(points: Iterable[Point], origin: Point | None = None) -> list[Point]:
    """The Pareto front, starting at `origin` (the base model: no learning, no forgetting) when given. A run
    that learned something while forgetting nothing dominates the base and would cut the front's start
    off, leaving low levels unread; every method passes through the base, so the front is read from it."""
    front = pareto_front(points)
    if origin is None:
        return front
    return [origin, *(p for p in front if p.learning > origin.learning)]


def interpolation(front: Sequence[Point], level: float) -> list[tuple[Point, float]] | None:
    """The front's points and weights whose weighted forgetting is the front's forgetting at `level`
    (linear between neighbours by learning); None if the front does not span the level. Weights, not a
    number, so another forgetting measure of the same points (test instead of validation, a bootstrap
    replicate) is read at the same place."""
    if not front:
        return None
    pts = sorted(front, key=lambda p: p.learning)
    if level < pts[0].learning or level > pts[-1].learning:
        return None
    for a, b in zip(pts, pts[1:]):
        if a.learning <= level <= b.learning:
            if b.learning == a.learning:
                return [(min(a, b, key=lambda p: p.forgetting), 1.0)]
            w = (level - a.learning) / (b.learning - a.learning)
            return [(a, 1.0 - w), (b, w)]
    return [(pts[0], 1.0)]  # a single-point front at exactly `level`


def forgetting_at(front: Sequence[Point], level: float) -> float | None:
    """Forgetting where the front reaches `level` of learning; None if the front does not span it."""
    weights = interpolation(front, level)
    return None if weights is None else sum(w * p.forgetting for p, w in weights)


def common_levels(
    fronts: Iterable[Sequence[Point]], n: int = 5, min_fronts: int | None = None
) -> list[float]:
    """`n` learning levels evenly spaced over the range at least `min_fronts` fronts span (default: all of
    them, the overlap of their ranges); empty when no such range exists -- then no matched comparison
    exists and the report says so. With min_fronts < all, one method that learns little does not squeeze
    everyone's comparison to its range: above its reach it is reported as not reached."""
    fronts = list(fronts)
    k = len(fronts) if min_fronts is None else min(max(min_fronts, 1), len(fronts))
    if not fronts or sum(1 for f in fronts if f) < k:
        return []
    spans = sorted(((min(p.learning for p in f), max(p.learning for p in f)) for f in fronts if f),
                   key=lambda s: -s[1])  # fmt: skip
    lo, hi = max(s[0] for s in spans[:k]), spans[k - 1][1]
    if lo > hi:
        return []
    if n == 1 or lo == hi:
        return [lo]
    # the top level is `hi` itself: computed as lo + (hi - lo) it can round above the front that ends there
    return [lo + (hi - lo) * i / (n - 1) for i in range(n - 1)] + [hi]
