"""Matched-learning arithmetic on hand-made fronts (every expected number worked out by hand), and the
per-item and resampling helpers under it: aggregation as the evaluator does it, the stable item split,
cluster resampling."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from titan_mem.study import bootstrap as bs
from titan_mem.study.frontier import (
    Point,
    anchored_front,
    common_levels,
    forgetting_at,
    interpolation,
    learning_gain,
    pareto_front,
    relative_forgetting,
)
from titan_mem.study.items import aggregate, item_matrix, record_value, thirds, validation_mask
from titan_mem.study.spec import MetricRef


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


def test_interpolation_weights_read_another_measure_at_the_same_place():
    """The weights chosen on one forgetting measure (validation) read any other measure of the same
    points (test): 0.25 of the way from a to b is 0.75 a + 0.25 b whatever is read."""
    a, b = Point(0.2, 0.1, "a"), Point(0.6, 0.3, "b")
    weights = interpolation([a, b], 0.3)
    assert [(p.label, w) for p, w in weights] == [("a", pytest.approx(0.75)), ("b", pytest.approx(0.25))]
    test = {"a": 0.5, "b": 0.9}
    assert sum(w * test[p.label] for p, w in weights) == pytest.approx(0.6)
    assert interpolation([a, b], 0.7) is None


def test_common_levels_are_the_overlap_of_the_ranges():
    a = [Point(0.1, 0.0), Point(0.5, 0.1)]
    b = [Point(0.2, 0.0), Point(0.9, 0.3)]
    assert common_levels([a, b], n=3) == pytest.approx([0.2, 0.35, 0.5])
    assert common_levels([a, [Point(0.6, 0.0), Point(0.7, 0.1)]]) == []  # no overlap: no matched level
    # the top level is the shared maximum itself, not a rounding of it above the front that ends there
    top = 0.9999999999999996
    assert common_levels([[Point(0.0, 0.0), Point(top, 0.1)]], n=6)[-1] == top
    # at least two of three: a method that learns little does not cap the others' comparison
    c = [Point(0.0, 0.0), Point(0.05, 0.0)]
    assert common_levels([a, b, c], n=3, min_fronts=2) == pytest.approx([0.2, 0.35, 0.5])
    assert common_levels([a, b, c], n=3) == []  # c's [0, 0.05] overlaps none of [0.2, 0.5]


def test_fronts_read_from_the_base_when_a_run_forgets_nothing():
    """A run that learned 0.4 and forgot nothing dominates the base (0, 0); the matched reading still
    starts at the base, so level 0.2 is read on the segment base -> that run instead of 'not reached'."""
    base = Point(0.0, 0.0, "base")
    pts = [Point(0.4, 0.0, "a"), Point(0.8, 0.2, "b"), Point(0.3, 0.1, "dominated")]
    assert [p.label for p in pareto_front([base, *pts])] == ["a", "b"]
    front = anchored_front(pts, base)
    assert [p.label for p in front] == ["base", "a", "b"]
    assert forgetting_at(front, 0.2) == pytest.approx(0.0) and forgetting_at(front, 0.6) == pytest.approx(0.1)
    assert forgetting_at(pareto_front(pts), 0.2) is None  # unanchored: level 0.2 is unread


def test_aggregates_are_token_weighted_for_nll_and_plain_for_scores():
    items = {"id": ["a", "b"], "answer_nll": [1.0, 4.0], "f1": [0.0, 1.0], "tokens": [3, 1]}
    assert aggregate(items, "answer_nll") == pytest.approx((3 * 1.0 + 4.0) / 4)  # 1.75, not 2.5
    assert aggregate(items, "f1") == pytest.approx(0.5)  # not token-weighted
    rec = {"arm": "x", "step": 1, "items": {"t": items}, "metrics": {"t:answer_nll": 9.9, "u:acc": 0.3}}
    assert record_value(rec, MetricRef("t", "answer_nll")) == pytest.approx(1.75)  # items win
    assert record_value(rec, MetricRef("u", "acc")) == pytest.approx(0.3)  # no items: the aggregate
    with pytest.raises(ValueError, match="arm x step 1 has no metric v:nll"):
        record_value(rec, MetricRef("v", "nll"))


def test_item_split_is_stable_disjoint_and_covers():
    ids = [str(i) for i in range(200)]
    val = validation_mask({"id": ids})
    assert val.tolist() == [zlib.crc32(i.encode()) % 2 == 0 for i in ids]  # not Python's salted hash
    assert 60 < val.sum() < 140  # both splits well populated; together they are every item
    # with people, a person's items all fall on one side
    grouped = validation_mask({"id": [f"p{g}-{j}" for g in range(30) for j in range(3)],
                               "group": [g for g in range(30) for _ in range(3)]})  # fmt: skip
    per_person = grouped.reshape(30, 3)
    assert (per_person.all(axis=1) | ~per_person.any(axis=1)).all()
    assert 0 < per_person[:, 0].sum() < 30


def test_items_align_to_the_base_order_and_other_items_are_refused():
    base = {"arm": "base",
            "items": {"t": {"id": ["a", "b", "c"], "nll": [1.0, 2.0, 3.0], "tokens": [1, 1, 2]}}}  # fmt: skip
    arm = {"arm": "x", "step": 1, "items": {"t": {"id": ["c", "a", "b"], "nll": [30.0, 10.0, 20.0],
                                                  "tokens": [2, 1, 1]}}}  # fmt: skip
    m = item_matrix(base, [arm], MetricRef("t", "nll"))
    assert m.v[0].tolist() == [10.0, 20.0, 30.0] and m.w[0].tolist() == [1.0, 1.0, 2.0]
    arm["items"]["t"]["id"] = ["c", "a", "z"]
    with pytest.raises(ValueError, match="arm x step 1: the items of t are not its base's"):
        item_matrix(base, [arm], MetricRef("t", "nll"))


def test_cluster_resampling_draws_whole_people():
    clusters = bs.cluster_index([7, 7, 7, 3, 3, 3, 9, 9, 9], 9)
    counts = bs.item_counts(clusters, 50, np.random.default_rng(0))
    assert counts.shape == (9, 51) and (counts[:, 0] == 1).all()  # column 0: the estimate
    per_person = counts[:, 1:].reshape(3, 3, 50)
    assert (per_person == per_person[:, :1]).all()  # a person's facts are drawn together
    assert (counts[:, 1:].sum(axis=0) == 9).all()  # three people drawn per replicate
    assert counts[:, 1:].std() > 0
    alone = bs.item_counts(bs.cluster_index(None, 5), 20, np.random.default_rng(0))
    assert (alone[:, 1:].sum(axis=0) == 5).all() and len({tuple(c) for c in alone[:, 1:].T}) > 1


def test_resampled_mean_leaves_out_what_was_not_measured():
    values = np.array([[1.0, 1.0, 2.0], [3.0, 3.0, np.nan], [np.nan, 5.0, 5.0]])  # 3 run sets, 2 replicates
    counts = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    est, reps = bs.resampled_mean(values, counts)
    assert est == pytest.approx(2.0)  # run set 3 has no estimate
    assert reps.tolist() == pytest.approx([3.0, (2 * 2.0 + 5.0) / 3])
    lo, hi = bs.percentile_ci(np.arange(101.0), 0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    assert bs.percentile_ci(np.array([np.nan]), 0.9) == (None, None)


def test_thirds_by_first_teaching():
    pos = {f"f{i}": i for i in range(7)}
    early, late = thirds(["f5", "f5", "x", "f1", "f0", "f3", "f2", "f4", "f6", "f1"], pos)
    assert (early, late) == ([5, 1], [4, 6])  # repeats and unknown ids skipped; 7 facts -> thirds of 2
    assert thirds(["f1", "f2"], pos) == ([], [])
