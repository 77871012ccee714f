"""Matched-learning arithmetic on hand-made fronts (every expected number worked out by hand)."""

from __future__ import annotations

import pytest

from titan_mem.study.frontier import (
    Point,
    anchored_front,
    common_levels,
    forgetting_at,
    learning_gain,
    matched_forgetting,
    pareto_front,
    relative_forgetting,
)


def test_gain_and_relative_forgetting_directions():
    assert learning_gain(0.1, 0.4, higher_is_better=True) == pytest.approx(0.3)  # F1 up
    assert learning_gain(3.8, 3.3, higher_is_better=False) == pytest.approx(0.5)  # NLL down
    assert relative_forgetting(0.50, 0.40, higher_is_better=True) == pytest.approx(0.2)  # F1 -20 %
    assert relative_forgetting(2.0, 2.2, higher_is_better=False) == pytest.approx(0.1)  # NLL +10 %
    assert relative_forgetting(2.0, 1.8, higher_is_better=False) == pytest.approx(-0.1)  # improved
    with pytest.raises(ValueError, match="base value is 0"):
        relative_forgetting(0.0, 0.1, higher_is_better=True)


def test_pareto_front_drops_dominated_runs():
    pts = [Point(0.1, 0.05, "a"), Point(0.2, 0.30, "b"), Point(0.2, 0.10, "c"), Point(0.4, 0.20, "d"),
           Point(0.3, 0.25, "e"), Point(0.05, 0.01, "f")]  # fmt: skip
    # b is beaten by c (same learning, less forgetting); e by d (more learning, less forgetting)
    assert [p.label for p in pareto_front(pts)] == ["f", "a", "c", "d"]


def test_forgetting_interpolates_along_the_front_and_never_extrapolates():
    front = [Point(0.1, 0.05), Point(0.3, 0.15), Point(0.5, 0.55)]
    assert forgetting_at(front, 0.2) == pytest.approx(0.10)  # halfway between 0.05 and 0.15
    assert forgetting_at(front, 0.4) == pytest.approx(0.35)  # halfway between 0.15 and 0.55
    assert forgetting_at(front, 0.3) == pytest.approx(0.15)  # on a point
    assert forgetting_at(front, 0.05) is None and forgetting_at(front, 0.6) is None
    assert forgetting_at([Point(0.2, 0.1)], 0.2) == pytest.approx(0.1)
    assert forgetting_at([], 0.2) is None


def test_matched_forgetting_over_seeds():
    seeds = {
        0: [Point(0.0, 0.0), Point(0.4, 0.2)],  # at 0.2: 0.1
        1: [Point(0.0, 0.0), Point(0.4, 0.4)],  # at 0.2: 0.2
        2: [Point(0.0, 0.0), Point(0.1, 0.1)],  # does not reach 0.2
    }
    (m,) = matched_forgetting(seeds, [0.2])
    assert (m.n_seeds, m.n_reached) == (3, 2)
    assert m.mean == pytest.approx(0.15)
    assert m.std == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.1, 0.2


def test_common_levels_are_the_overlap_of_the_ranges():
    a = [Point(0.1, 0.0), Point(0.5, 0.1)]
    b = [Point(0.2, 0.0), Point(0.9, 0.3)]
    assert common_levels([a, b], n=3) == pytest.approx([0.2, 0.35, 0.5])
    assert common_levels([a, [Point(0.6, 0.0), Point(0.7, 0.1)]]) == []  # no overlap: no matched level


def test_fronts_read_from_the_base_when_a_run_forgets_nothing():
    """A run that learned 0.4 and forgot nothing dominates the base (0, 0); the matched reading still
    starts at the base, so level 0.2 is read on the segment base -> that run instead of 'not reached'."""
    base = Point(0.0, 0.0, "base")
    pts = [Point(0.4, 0.0, "a"), Point(0.8, 0.2, "b"), Point(0.3, 0.1, "dominated")]
    assert [p.label for p in pareto_front([base, *pts])] == ["a", "b"]
    assert [p.label for p in anchored_front(pts, base)] == ["base", "a", "b"]
    (low, high) = matched_forgetting({0: pts}, [0.2, 0.6], origin=base)
    assert low.mean == pytest.approx(0.0) and high.mean == pytest.approx(0.1)
    (unanchored,) = matched_forgetting({0: pts}, [0.2])
    assert unanchored.n_reached == 0
