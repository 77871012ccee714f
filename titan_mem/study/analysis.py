"""From a study's records to the comparison it exists for: every evaluation point of every arm on the
learning-forgetting plane, each method's Pareto front, and forgetting at matched learning with its spread
over seeds (frontier.py has the arithmetic).

* learning of a point  = `learning_gain` of the study's learning metric over the base;
* forgetting of a point = the mean, over the study's forgetting metrics, of each metric's
  `relative_forgetting` against the base (0.1 = held-out metrics 10 % worse on average); per-metric
  numbers are kept too;
* every evaluation point of an arm is a point (an earlier point is the same run stopped earlier), so a
  method's front is over its sweep *and* its training length; every front starts at the base, (0, 0)
  (zero steps: `frontier.anchored_front`);
* fronts are per seed; levels are where every method's front (pooled over seeds) spans the same learning.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from titan_mem.study.frontier import (
    Matched,
    Point,
    anchored_front,
    common_levels,
    learning_gain,
    matched_forgetting,
    relative_forgetting,
)
from titan_mem.study.spec import MetricRef, StudySpec

AVERAGE = "mean held-out"
BASE_POINT = Point(0.0, 0.0, "base")


@dataclass
class Analysis:
    base: dict[str, float]
    learning: MetricRef
    forgetting: list[MetricRef]
    show: list[MetricRef]
    # method -> forgetting name (AVERAGE or a metric) -> seed -> points
    points: dict[str, dict[str, dict[int, list[Point]]]] = field(default_factory=dict)
    levels: list[float] = field(default_factory=list)
    # forgetting name -> method -> matched forgetting at `levels`
    matched: dict[str, dict[str, list[Matched]]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return list(self.points)

    def pooled_front(self, method: str, name: str = AVERAGE) -> list[Point]:
        return anchored_front((p for pts in self.points[method][name].values() for p in pts), BASE_POINT)


def _value(rec_metrics: dict[str, float], ref: MetricRef, where: str) -> float:
    key = str(ref)
    if key not in rec_metrics:
        have = ", ".join(sorted(rec_metrics)[:8])
        raise ValueError(f"results: {where} has no metric {key} (is its task in eval.tasks? have: {have})")
    return rec_metrics[key]


def forgetting_of(base: dict[str, float], metrics: dict[str, float], refs: list[MetricRef], where: str):
    """Per-metric relative forgetting and their mean."""
    per = {}
    for ref in refs:
        b, v = _value(base, ref, "the base evaluation"), _value(metrics, ref, where)
        try:
            per[str(ref)] = relative_forgetting(b, v, ref.higher_is_better)
        except ValueError:
            raise ValueError(
                f"results: forgetting metric {ref} is 0 on the base: relative forgetting has no scale "
                "(choose a metric the base does not score 0 on)"
            ) from None
    return per, statistics.fmean(per.values())


def analyze(
    spec: StudySpec, base: dict[str, float], records: list[dict[str, Any]], n_levels: int = 5
) -> Analysis:
    out = Analysis(base, spec.learning, spec.forgetting, spec.show, records=records)
    base_learning = _value(base, spec.learning, "the base evaluation")
    names = [AVERAGE, *(str(r) for r in spec.forgetting)]
    points: dict[str, dict[str, dict[int, list[Point]]]] = defaultdict(
        lambda: {n: defaultdict(list) for n in names}
    )
    for rec in records:
        where = f"arm {rec['arm']} step {rec['step']}"
        gain = learning_gain(
            base_learning, _value(rec["metrics"], spec.learning, where), spec.learning.higher_is_better
        )
        per, mean = forgetting_of(base, rec["metrics"], spec.forgetting, where)
        label = f"{rec['arm']}@{rec['step']}"
        for name, value in ((AVERAGE, mean), *per.items()):
            points[rec["method"]][name][rec["seed"]].append(Point(gain, value, label))
    out.points = {m: {n: dict(by_seed) for n, by_seed in v.items()} for m, v in points.items()}
    # level 0 is the base, where every method forgets nothing: compare above it
    levels = common_levels([out.pooled_front(m) for m in out.methods], n_levels + 1)
    out.levels = [x for x in levels if x > 0]
    out.matched = {
        name: {m: matched_forgetting(out.points[m][name], out.levels, BASE_POINT) for m in out.methods}
        for name in names
    }
    return out


def arm_summaries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, params): the final evaluation point of each seed's run, metrics averaged over seeds
    with their sample std (0 for one seed)."""
    last: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec["arm"] not in last or rec["step"] > last[rec["arm"]]["step"]:
            last[rec["arm"]] = rec
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in last.values():
        groups[(rec["method"], tuple(sorted(rec["params"].items())))].append(rec)
    out = []
    for (method, params), recs in groups.items():
        keys = set.intersection(*(set(r["metrics"]) for r in recs))
        mean = {k: statistics.fmean(r["metrics"][k] for r in recs) for k in keys}
        std = {k: statistics.stdev(r["metrics"][k] for r in recs) if len(recs) > 1 else 0.0 for k in keys}
        rows = [r["rows_per_step"] for r in recs if "rows_per_step" in r]
        out.append({
            "method": method, "params": dict(params), "seeds": len(recs), "step": recs[0]["step"],
            "mean": mean, "std": std, "rows_per_step": statistics.fmean(rows) if rows else None,
        })  # fmt: skip
    return out
