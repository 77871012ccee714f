"""The study's analysis on synthetic per-item records whose answers are known by hand (study_records.py):
specific learning, selection on validation and reading on test, bootstrap intervals over run sets and
items, run sets that do not reach a level, paired differences, retention, per-geometry/group/base
bookkeeping, and the report files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from study_records import World, spec

from titan_mem.study.analysis import summarize
from titan_mem.study.report import write_report
from titan_mem.study.tables import cell


def _group(s: dict, geometry: str = "1M", group: str = "headline") -> dict:
    return s["geometries"][geometry]["groups"][group]


def _at(view: dict, method: str, level: float, table: str | None = "matched") -> dict:
    """The cell of `method` at `level` in view[table] (or in `view` itself: a per-metric table)."""
    (c,) = [c for c in (view[table] if table else view)[method] if c["level"] == pytest.approx(level)]
    return c


def _width(c: dict) -> float:
    return c["ci_high"] - c["ci_low"]


def test_learning_is_taught_gain_minus_untaught_gain():
    """A method that lowers taught and untaught answers alike (a shifted answer prior) learns nothing."""
    w = World()
    recs = [w.base(),
            w.point("sparse", 0, 1, learn=0.5, val=0.1, shift=1.0),  # taught -1.5 nats, untaught -1.0
            w.point("full", 0, 1, learn=0.0, val=0.2, shift=1.0, f1_learn=0.1, f1_shift=0.2)]  # fmt: skip
    main = _group(summarize(spec(), recs))["views"]["main"]
    assert main["points"]["sparse"][0][0] == pytest.approx(0.5)
    assert main["points"]["full"][0][0] == pytest.approx(0.0)
    assert main["levels"] == []  # full learned nothing specific: no matched comparison exists
    f1 = _group(summarize(spec(), recs))["views"]["f1"]
    assert f1["points"]["full"][0][0] == pytest.approx(0.1)  # F1 taught +0.3, untaught +0.2
    # without the control, the prior shift would count as learning (1.5 and 1.0 nats) and levels exist
    raw = _group(summarize(spec(control=None), recs))["views"]["main"]
    assert [p[0] for p in raw["points"]["full"]] == pytest.approx([1.0]) and raw["levels"]


def test_fronts_are_chosen_on_validation_and_read_on_test():
    """Config A forgets little on validation but much on test, B the reverse, at the same learning: the
    front is A (chosen on validation) and the matched forgetting is A's test forgetting. The prose metric
    has no split tasks: its validation/test items come from the hash, so a mix would not give 0.30."""
    w = World()
    a = w.point("sparse", 0, 1, learn=1.0, val=0.05, test=0.30, config="A")
    b = w.point("sparse", 0, 1, learn=1.0, val=0.10, test=0.02, config="B")
    full = w.point("full", 0, 1, learn=1.0, val=0.10, test=0.10)
    main = _group(summarize(spec(), [w.base(), a, b, full]))["views"]["main"]
    (front,) = main["fronts"]["sparse"]
    assert [p["label"] for p in front["front"]] == ["base", "sparse-A-b0-seed0@1"]
    chosen = front["front"][1]
    assert chosen["val"] == pytest.approx(0.05) and chosen["test"] == pytest.approx(0.30)
    assert _at(main, "sparse", 1.0)["mean"] == pytest.approx(0.30)  # a test-chosen front would say 0.02
    assert _at(main, "sparse", 0.2)["mean"] == pytest.approx(0.06)  # from the base: 0.2 of the way to A
    assert _at(main, "full", 1.0)["mean"] == pytest.approx(0.10)


def test_the_f1_view_rebuilds_fronts_on_f1_learning():
    """p1 learns more NLL, p2 more F1: the NLL front drops p2, the F1 front keeps both."""
    w = World()
    p1 = w.point("sparse", 0, 1, learn=1.0, val=0.1, f1_learn=0.1, config="p1")
    p2 = w.point("sparse", 0, 2, learn=0.5, val=0.2, f1_learn=0.3, f1_shift=0.2, config="p2")
    full = w.point("full", 0, 1, learn=1.0, val=0.3, f1_learn=0.3)
    views = _group(summarize(spec(), [w.base(), p1, p2, full]))["views"]
    assert views["f1"]["levels"] == pytest.approx([0.06, 0.12, 0.18, 0.24, 0.30])
    assert _at(views["f1"], "sparse", 0.30)["mean"] == pytest.approx(0.2)  # p2 (F1 +0.5 - control 0.2)
    assert _at(views["f1"], "sparse", 0.18)["mean"] == pytest.approx(0.14)  # 0.4 of the way p1 -> p2
    assert _at(views["main"], "sparse", 1.0)["mean"] == pytest.approx(0.1)  # p1
    assert _at(views["f1"], "full", 0.30)["mean"] == pytest.approx(0.3)


def _noisy(people: int, noise: float = 0.4, seeds=(0,)) -> list[dict]:
    w = World(people=people)
    recs = [w.base()]
    for seed in seeds:
        recs += [w.point("sparse", seed, 1, learn=1.0, val=0.05, test=0.05, noise=noise),
                 w.point("full", seed, 1, learn=1.0, val=0.15, test=0.15, noise=noise)]  # fmt: skip
    return recs


def test_item_intervals_contain_the_mean_and_narrow_with_more_items():
    few = _group(summarize(spec(), _noisy(10)))["views"]["main"]
    many = _group(summarize(spec(), _noisy(120)))["views"]["main"]
    for view in (few, many):
        for m in ("sparse", "full"):
            c = _at(view, m, 1.0)
            assert c["ci_low"] < c["mean"] < c["ci_high"]
    assert _width(_at(many, "sparse", 1.0)) < 0.5 * _width(_at(few, "sparse", 1.0))
    t = "t/known_{split}:answer_nll"
    assert _width(_at(many["per_metric"][t], "full", 1.0, None)) < 0.5 * _width(
        _at(few["per_metric"][t], "full", 1.0, None)
    )
    # noise-free metrics have no item spread: their interval is the point
    prose = _at(few["per_metric"]["prose:nll"], "full", 1.0, None)
    assert prose["ci_low"] == pytest.approx(0.15) and prose["ci_high"] == pytest.approx(0.15)


def test_run_sets_are_averaged_and_resampled():
    """Two seeds that forget 10 % and 30 % at the same learning: the mean is 20 %, the interval spans
    the seeds' spread (items carry no noise here), the same data and seed give the same numbers."""
    w = World()
    recs = [
        w.base(),
        w.point("sparse", 0, 1, learn=1.0, val=0.1),
        w.point("sparse", 1, 1, learn=1.0, val=0.3),
        w.point("full", 0, 1, learn=1.0, val=0.4),
    ]
    s = summarize(spec(), recs)
    c = _at(_group(s)["views"]["main"], "sparse", 1.0)
    assert c["mean"] == pytest.approx(0.2) and (c["n_reached"], c["n_run_sets"]) == (2, 2)
    assert c["ci_low"] == pytest.approx(0.1) and c["ci_high"] == pytest.approx(0.3)
    assert summarize(spec(), recs) == s
    other = summarize(spec(seed=1), _noisy(10))
    assert _at(_group(other)["views"]["main"], "full", 1.0) != _at(
        _group(summarize(spec(), _noisy(10)))["views"]["main"], "full", 1.0
    )


def test_a_level_a_run_set_does_not_reach_is_reported_as_such():
    """Seed 1's sparse front stops at learning 1: at level 2 sparse rests on seed 0 alone, and says so."""
    w = World()
    recs = [w.base(),
            w.point("sparse", 0, 1, learn=1.0, val=0.1), w.point("sparse", 0, 2, learn=2.0, val=0.2),
            w.point("sparse", 1, 1, learn=1.0, val=0.3),
            w.point("full", 0, 2, learn=2.0, val=0.4)]  # fmt: skip
    main = _group(summarize(spec(), recs))["views"]["main"]
    top = _at(main, "sparse", 2.0)
    assert (top["n_reached"], top["n_run_sets"], top["mean"]) == (1, 2, pytest.approx(0.2))
    assert _at(main, "sparse", 0.8)["mean"] == pytest.approx((0.08 + 0.24) / 2)  # both reach 0.8
    assert cell(top).endswith("(1/2 run sets)")
    assert cell({"mean": None, "ci_low": None, "ci_high": None, "n_reached": 0, "n_run_sets": 3}) == (
        "not reached (0/3)"
    )


def test_differences_exclude_zero_only_when_one_method_clearly_forgets_more():
    clear = _group(summarize(spec(), _noisy(30, noise=0.3)))["views"]["main"]
    d = _at(clear, "full", 1.0, "differences")
    assert d["mean"] == pytest.approx(0.10, abs=0.02) and d["ci_low"] > 0 and d["excludes_zero"]
    w = World(people=30)
    same = [w.base(), w.point("sparse", 0, 1, learn=1.0, val=0.1, noise=0.3),
            w.point("full", 0, 1, learn=1.0, val=0.1, noise=0.3)]  # fmt: skip
    d = _at(_group(summarize(spec(), same))["views"]["main"], "full", 1.0, "differences")
    assert d["ci_low"] < 0 < d["ci_high"] and not d["excludes_zero"]


def test_differences_are_paired_over_items():
    """full = sparse's very items 6 % worse on known-fact NLL: each method's interval is wide (noisy
    items), the difference's is narrow (both read under the same item draws) and excludes 0."""
    w = World(people=10)
    sparse = w.point("sparse", 0, 1, learn=1.0, val=0.0, noise=0.8)
    full = copy.deepcopy(sparse)
    full.update(arm="full-c0-b0-seed0", method="full")
    known = full["items"]["t/known_test"]
    known["answer_nll"] = [x * 1.06 for x in known["answer_nll"]]
    main = _group(summarize(spec(), [w.base(), sparse, full]))["views"]["main"]
    d, s, f = _at(main, "full", 1.0, "differences"), _at(main, "sparse", 1.0), _at(main, "full", 1.0)
    assert f["ci_low"] < s["ci_high"]  # the methods' own intervals overlap
    assert d["excludes_zero"] and _width(d) < 0.2 * _width(s)


def test_retention_is_negative_when_early_facts_are_lost():
    w = World()
    order = w.taught[::-1]  # another stream order: the "early" facts are the last ids
    recs = [w.base(),
            w.point("sparse", 0, 1, learn=1.0, val=0.1, early_loss=0.3, order=order),
            w.point("full", 0, 1, learn=1.0, val=0.2)]  # fmt: skip
    main = _group(summarize(spec(), recs))["views"]["main"]
    top = main["levels"][-1]
    sparse, full = _at(main, "sparse", top, "retention"), _at(main, "full", top, "retention")
    assert sparse["mean"] == pytest.approx(-0.3) and sparse["ci_high"] < 0
    assert full["mean"] == pytest.approx(0.0)
    for r in recs[1:]:
        del r["taught_order"]
    main = _group(summarize(spec(), recs))["views"]["main"]
    assert all(c["mean"] is None for c in main["retention"]["sparse"])


def test_geometries_bases_and_groups_are_kept_apart():
    """Each arm is measured against the base of its own (geometry, base seed) -- base seed 1's answers are
    20 % harder -- and methods are compared within their group only."""
    w = World()
    recs = [w.base("4K"), w.base("1M"), w.base("1M", base_seed=1, scale=1.2),
            w.point("sparse", 0, 1, learn=1.0, val=0.1, geometry="4K"),
            w.point("full", 0, 1, learn=1.0, val=0.3, geometry="4K"),
            w.point("sparse", 0, 1, learn=1.0, val=0.1),
            w.point("sparse", 0, 1, learn=1.0, val=0.2, base_seed=1, base_scale=1.2),
            w.point("full", 0, 1, learn=1.0, val=0.5),
            w.point("sparse", 0, 1, learn=1.0, val=0.05, group="ranking_t50")]  # fmt: skip
    s = summarize(spec(), recs)
    assert list(s["geometries"]) == ["4K", "1M"]
    one_m = s["geometries"]["1M"]
    assert list(one_m["groups"]) == ["headline", "ranking_t50"]
    assert one_m["groups"]["ranking_t50"]["methods"] == ["sparse"]
    assert one_m["groups"]["headline"]["run_sets"] == {"sparse": 2, "full": 1}
    head = one_m["groups"]["headline"]["views"]["main"]
    assert sorted(p[0] for p in head["points"]["sparse"]) == pytest.approx([1.0, 1.0])  # own base each
    assert _at(head, "sparse", 1.0)["mean"] == pytest.approx(0.15)
    assert _at(_group(s, "4K")["views"]["main"], "full", 1.0)["mean"] == pytest.approx(0.3)
    assert [b["base_seed"] for b in one_m["bases"]] == [0, 1]


def test_per_metric_tables_read_each_template_at_the_same_fronts():
    w = World()
    recs = [w.base(), w.point("sparse", 0, 1, learn=1.0, val=0.1), w.point("full", 0, 1, learn=1.0, val=0.1)]
    base_prose = recs[0]["items"]["prose"]["nll"]
    for r in recs[1:]:
        r["items"]["prose"]["nll"] = [x * 1.3 for x in base_prose]  # prose 30 % worse on both splits
    main = _group(summarize(spec(), recs))["views"]["main"]
    assert _at(main["per_metric"]["prose:nll"], "sparse", 1.0, None)["mean"] == pytest.approx(0.3)
    assert _at(main["per_metric"]["t/known_{split}:f1"], "sparse", 1.0, None)["mean"] == pytest.approx(0.1)
    assert _at(main, "sparse", 1.0)["mean"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)


def test_report_files(tmp_path):
    w = World()
    recs = [w.base()]
    for seed in (0, 1):
        recs += [w.point("sparse", seed, s, learn=0.5 * s, val=0.05 * s, noise=0.1) for s in (1, 2)]
        recs += [w.point("full", seed, s, learn=0.5 * s, val=0.15 * s, noise=0.1) for s in (1, 2)]
    extra = {"Memory geometry": ["| geometry | slots |", "|---|---|", "| 1M | 1048576 |"]}
    report = write_report(spec(), recs, tmp_path, title="Study `hand`", extra=extra).read_text()
    assert report.startswith("# Study `hand`")
    assert "## Memory geometry\n\n| geometry | slots |" in report
    assert "| learning level | sparse | full |" in report and "| learning level | full − sparse |" in report
    assert "#### F1-matched view" in report and "`prose:nll`" in report
    assert "| headline | sparse | config=c0 | 2 | 2 | 50 |" in report  # final points over two seeds
    summary = json.loads((tmp_path / "summary.json").read_text())
    cells = summary["geometries"]["1M"]["groups"]["headline"]["views"]["main"]["matched"]["full"]
    assert set(cells[0]) == {"level", "mean", "ci_low", "ci_high", "n_reached", "n_run_sets"}
    assert cells[-1]["mean"] == pytest.approx(0.30, abs=0.01)  # step 2: learning 1, forgetting 30 %
    assert f"+{100 * cells[-1]['mean']:.1f} % [" in report
    for png in ("tradeoff_1M.png", "matched_1M.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_records_get_one_line_errors():
    w = World()
    base, arm = w.base(), w.point("sparse", 0, 1, learn=1.0, val=0.1)
    with pytest.raises(ValueError, match="no base record for geometry '4K' base_seed 0"):
        summarize(spec(), [base, w.point("sparse", 0, 1, learn=1.0, val=0.1, geometry="4K")])
    zero = w.base()
    zero["items"]["t/known_val"]["f1"] = [0.0] * len(zero["items"]["t/known_val"]["f1"])
    with pytest.raises(ValueError, match="t/known_val:f1 is 0 on the base of geometry '1M' base_seed 0"):
        summarize(spec(), [zero, arm])
    del arm["items"]["t/known_test"]
    with pytest.raises(ValueError, match="sparse-c0-b0-seed0 step 1 has no per-item t/known_test:answer_nll"):
        summarize(spec(), [base, arm])
    np.testing.assert_equal(len(summarize(spec(), [base])["geometries"]["1M"]["groups"]), 0)


def test_levels_within_the_reference_reach_when_the_grid_is_above_it():
    """Sparse learns 0.3 where full and LoRA reach 2 and 3: the grid spanned by two fronts (0.4 .. 2.0)
    leaves sparse unread, so 5 levels up to 0.3 are added, where every method is read and differenced."""
    w = World()
    recs = [w.base(), w.point("sparse", 0, 1, learn=0.3, val=0.3),
            w.point("full", 0, 1, learn=2.0, val=0.4), w.point("lora", 0, 1, learn=3.0, val=0.9)]  # fmt: skip
    main = _group(summarize(spec(), recs))["views"]["main"]
    assert main["levels"] == pytest.approx([0.06, 0.12, 0.18, 0.24, 0.3, 0.4, 0.8, 1.2, 1.6, 2.0])
    assert _at(main, "sparse", 0.3)["mean"] == pytest.approx(0.3)
    assert _at(main, "sparse", 0.4)["mean"] is None
    d = _at(main, "full", 0.3, "differences")
    assert d["mean"] == pytest.approx(0.3 / 2.0 * 0.4 - 0.3)  # full's front read at 0.3, minus sparse's
    # a reference that reaches the grid gets no extra levels
    recs[1] = w.point("sparse", 0, 1, learn=1.0, val=0.3)
    assert _group(summarize(spec(), recs))["views"]["main"]["levels"] == pytest.approx(
        [0.4, 0.8, 1.2, 1.6, 2.0]
    )
