"""From a study's per-item records to the comparison it exists for: forgetting at matched *specific*
learning, fronts chosen on validation and read on test, with bootstrap intervals over run sets and items
(docs/design.md, "The study"; frontier.py has the arithmetic, bootstrap.py the resampling).

* learning of a point = its gain in the `learning` metric over its base minus its gain in `control`
  (comparable untaught facts): lowering every answer's NLL by shifting the answer prior is not learning;
* forgetting of a point on a split = the mean over the forgetting templates of each metric's
  `relative_forgetting` against its base. A template with "{split}" names its own tasks (`_val`, `_test`);
  one without is split by item (a stable hash: even = validation, odd = test);
* a run set = every evaluation point of every config of one method on one (geometry, group, base seed,
  seed); its front is built on (learning, validation forgetting), anchored at the base, and read on test
  forgetting at levels at least two methods' fronts (pooled over run sets) span, and at levels within the
  reference's reach when it reaches none of those;
* the bootstrap resamples run sets and test items (people, where items have a "group") and re-reads test
  forgetting at the same validation-chosen front points; items are resampled once per replicate for
  every point of a base, so method differences are paired.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from titan_mem.errors import DataError
from titan_mem.study import bootstrap as bs
from titan_mem.study.frontier import Point, anchored_front, common_levels, interpolation, learning_gain
from titan_mem.study.items import (
    DEFAULT_GEOMETRY,
    DEFAULT_GROUP,
    SPLIT,
    item_matrix,
    record_value,
    split_records,
    template_ref,
    thirds,
    validation_mask,
    where,
)
from titan_mem.study.spec import MetricRef

BASE_POINT = Point(0.0, 0.0, "base")
MEAN = "forgetting"  # the measure name of mean test forgetting in per-level results
RETENTION = "retention"


@dataclass(frozen=True)
class AnalysisSpec:
    """What the study compares, as its spec declares it (the study spec builds this)."""

    learning: MetricRef  # taught facts, e.g. synthetic_qa/new_taught:answer_nll
    control: MetricRef | None  # comparable untaught facts: their gain is subtracted
    learning_f1: MetricRef | None  # the F1-matched view (as the paper reports)
    control_f1: MetricRef | None
    forgetting: tuple[str, ...]  # "task:metric" templates, "{split}" in the task where it has val/test
    show: tuple[MetricRef, ...] = ()
    n_levels: int = 5
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    reference: str = "sparse"  # differences are method - reference (else the group's first method)

    def __post_init__(self):
        object.__setattr__(self, "forgetting", tuple(self.forgetting))  # a list from a caller is fine too
        object.__setattr__(self, "show", tuple(self.show))
        if not self.forgetting:
            raise ValueError("analysis: no forgetting metrics")
        for t in self.forgetting:
            if ":" not in t:
                raise ValueError(f"analysis: forgetting template {t!r} is not 'task:metric'")
        if self.control_f1 is not None and self.learning_f1 is None:
            raise ValueError("analysis: control_f1 without learning_f1")
        if not 0 < self.ci < 1 or self.bootstrap < 0 or self.n_levels < 1:
            raise ValueError("analysis: need 0 < ci < 1, bootstrap >= 0, n_levels >= 1")

    def views(self) -> dict[str, tuple[MetricRef, MetricRef | None]]:
        """Learning axes: "main" (learning - control) and, when declared, "f1" (learning_f1 - control_f1)."""
        out = {"main": (self.learning, self.control)}
        if self.learning_f1 is not None:
            out["f1"] = (self.learning_f1, self.control_f1)
        return out


def _rel_forgetting(base: np.ndarray, value: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """frontier.relative_forgetting over arrays; a replicate whose base is 0 gives nan."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((base - value) if higher_is_better else (value - base)) / np.abs(base)
    return np.where(np.isfinite(out), out, np.nan)


@dataclass
class Block:
    """One base (geometry, base_seed) and every arm point compared to it, with each point's numbers:
    learning per view (points,), validation forgetting (points,), test forgetting per template and its
    mean, and retention (points x (1 + replicates), column 0 = estimate)."""

    geometry: str
    base_seed: Any
    base: dict[str, Any]
    recs: list[dict[str, Any]]
    learning: dict[str, np.ndarray]
    val: np.ndarray
    test: dict[str, np.ndarray]
    retention: np.ndarray


def _check_base_scale(value: float, what: str, base: dict[str, Any]) -> None:
    if value == 0 or not np.isfinite(value):
        raise DataError(
            f"results: forgetting metric {what} is 0 on {where(base)}: relative forgetting has no scale "
            "(choose a metric the base does not score 0 on)"
        )


def build_block(aspec: AnalysisSpec, base: dict, recs: list[dict], rng: np.random.Generator) -> Block:
    """Every per-point number of one base's points; item replicates are drawn here, once per template."""
    n_rep = aspec.bootstrap
    learning = {}
    for view, (ref, control) in aspec.views().items():
        gain = _gains(base, recs, ref)
        learning[view] = gain - _gains(base, recs, control) if control is not None else gain
    val_parts, test = [], {}
    for template in aspec.forgetting:
        if SPLIT in template:
            val_ref, test_ref = template_ref(template, "val"), template_ref(template, "test")
            b = record_value(base, val_ref)
            _check_base_scale(b, str(val_ref), base)
            vals = np.array([record_value(r, val_ref) for r in recs])
            val_parts.append(_rel_forgetting(np.float64(b), vals, val_ref.higher_is_better))
            m = item_matrix(base, recs, test_ref)
        else:
            ref = template_ref(template, None)
            full = item_matrix(base, recs, ref)
            is_val = validation_mask(base["items"][ref.task])
            if is_val.all() or not is_val.any():
                raise DataError(f"results: the {len(is_val)} items of {ref.task} all fall in one split; "
                                 "validation and test need both")  # fmt: skip
            vm = full.subset(is_val)
            b, vals = vm.means(np.ones((len(vm.ids), 1)))
            _check_base_scale(float(b[0]), f"{ref} (validation items)", base)
            val_parts.append(_rel_forgetting(b[0], vals[:, 0], ref.higher_is_better))
            m, test_ref = full.subset(~is_val), ref
        counts = bs.item_counts(bs.cluster_index(m.groups, len(m.ids)), n_rep, rng)
        b, vals = m.means(counts)
        _check_base_scale(float(b[0]), f"{test_ref} (test items)", base)
        test[template] = _rel_forgetting(b[None], vals, test_ref.higher_is_better)
    test[MEAN] = np.mean([test[t] for t in aspec.forgetting], axis=0)
    val = np.mean(val_parts, axis=0)
    return Block(base.get("geometry", DEFAULT_GEOMETRY), base.get("base_seed", 0), base, recs, learning,
                 val, test, _retention(aspec, base, recs, rng))  # fmt: skip


def _gains(base: dict, recs: list[dict], ref: MetricRef) -> np.ndarray:
    b = record_value(base, ref)
    return np.array([learning_gain(b, record_value(r, ref), ref.higher_is_better) for r in recs])


def _retention(aspec: AnalysisSpec, base: dict, recs: list[dict], rng: np.random.Generator) -> np.ndarray:
    """Per point and replicate: mean per-item gain of the earliest-taught third minus the latest-taught
    third (negative = facts taught early were lost while later ones were learned); nan where the record
    has no taught order or the learning task no items."""
    ref = aspec.learning
    try:
        m = item_matrix(base, recs, ref)
    except ValueError:
        return np.full((len(recs), aspec.bootstrap + 1), np.nan)
    gain = (m.v - m.base_v) if ref.higher_is_better else (m.base_v - m.v)
    early, late = np.zeros_like(gain), np.zeros_like(gain)
    pos = {str(x): j for j, x in enumerate(m.ids)}
    for i, rec in enumerate(recs):
        e, lt = thirds(rec.get("taught_order") or [], pos)
        early[i, e], late[i, lt] = 1.0, 1.0
    counts = bs.item_counts(bs.cluster_index(m.groups, len(m.ids)), aspec.bootstrap, rng)
    return bs.weighted_means(gain, early, counts) - bs.weighted_means(gain, late, counts)


def _label(rec: dict) -> str:
    return f"{rec['arm']}@{rec['step']}"


def _num(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _cell(level: float, est: float | None, reps: np.ndarray, ci: float, **more) -> dict[str, Any]:
    lo, hi = bs.percentile_ci(reps, ci) if est is not None else (None, None)
    return {"level": level, "mean": _num(est), "ci_low": lo, "ci_high": hi, **more}


@dataclass
class RunSet:
    block: Block
    method: str
    seed: Any
    idx: list[int]  # the block's points of this run set


def _front(rs: RunSet, learning: np.ndarray) -> list[Point]:
    return anchored_front((Point(float(learning[i]), float(rs.block.val[i]), str(i)) for i in rs.idx),
                          BASE_POINT)  # fmt: skip


def _read(weights: list[tuple[Point, float]], per_point: np.ndarray) -> np.ndarray:
    """A per-point measure (points x replicates) read at interpolation `weights` on a front; the base
    anchor contributes 0 (the base compared to itself)."""
    out = np.zeros(per_point.shape[1])
    for p, w in weights:
        if p.label != BASE_POINT.label and w:
            out = out + w * per_point[int(p.label)]
    return out


def _view(aspec: AnalysisSpec, view: str, methods: list[str], run_sets: dict[str, list[RunSet]],
          rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """One learning axis of one (geometry, group): fronts, levels, matched measures, differences."""
    fronts = {m: [_front(rs, rs.block.learning[view]) for rs in run_sets[m]] for m in methods}
    pooled = [anchored_front((p for f in fronts[m] for p in f), BASE_POINT) for m in methods]
    # the base is level 0 for everyone (nothing learned, nothing forgotten): compare above it
    # levels up to where at least two series reach (all of them when only two are compared)
    levels = [x for x in common_levels(pooled, aspec.n_levels + 1, min_fronts=2) if x > 0]
    levels = _reference_levels(pooled[0], pooled[1:], levels, aspec.n_levels) + levels
    measures = [MEAN, *aspec.forgetting, RETENTION]
    out: dict[str, Any] = {"levels": levels, "matched": {}, "per_metric": {t: {} for t in aspec.forgetting},
                           RETENTION: {}, "differences": {}, "fronts": {}, "points": {}}  # fmt: skip
    reps_of: dict[str, list[np.ndarray | None]] = {}
    for m in methods:
        rows: dict[str, list] = {k: [] for k in measures}
        reps_of[m] = []
        for level in levels:
            read = {k: [] for k in measures}
            for rs, front in zip(run_sets[m], fronts[m]):
                weights = interpolation(front, level)
                if weights is None:  # this run set's front does not reach the level
                    continue
                per = {MEAN: rs.block.test[MEAN], RETENTION: rs.block.retention,
                       **{t: rs.block.test[t] for t in aspec.forgetting}}  # fmt: skip
                for k in measures:
                    read[k].append(_read(weights, per[k]))
            n = len(read[MEAN])
            counts = bs.run_set_counts(n, aspec.bootstrap, rng)
            for k in measures:
                est, reps = bs.resampled_mean(np.array(read[k]), counts) if n else (None, np.array([]))
                rows[k].append(_cell(level, est, reps, aspec.ci, n_reached=n, n_run_sets=len(run_sets[m])))
                if k == MEAN:
                    reps_of[m].append(reps if est is not None else None)
        out["matched"][m], out[RETENTION][m] = rows[MEAN], rows[RETENTION]
        for t in aspec.forgetting:
            out["per_metric"][t][m] = rows[t]
        out["fronts"][m] = [
            {"base_seed": rs.block.base_seed, "seed": rs.seed,
             "front": [_front_point(rs.block, p) for p in front]}
            for rs, front in zip(run_sets[m], fronts[m])
        ]  # fmt: skip
        out["points"][m] = [
            [float(rs.block.learning[view][i]), float(rs.block.val[i]), _num(rs.block.test[MEAN][i, 0])]
            for rs in run_sets[m] for i in rs.idx
        ]  # fmt: skip
    ref = methods[0]
    for m in methods[1:]:
        cells = []
        for i, level in enumerate(levels):
            a, b = out["matched"][m][i]["mean"], out["matched"][ref][i]["mean"]
            if a is None or b is None:
                cells.append(_cell(level, None, np.array([]), aspec.ci, excludes_zero=False))
                continue
            cell = _cell(level, a - b, reps_of[m][i] - reps_of[ref][i], aspec.ci)
            lo, hi = cell["ci_low"], cell["ci_high"]
            cell["excludes_zero"] = lo is not None and (lo > 0 or hi < 0)
            cells.append(cell)
        out["differences"][m] = cells
    return out


def _reference_levels(
    reference: list[Point], others: list[list[Point]], levels: list[float], n: int
) -> list[float]:
    """`n` more levels evenly over (0, the reach of the reference and another method] when the reference
    reaches none of `levels`: the hypothesis is about the reference against each other method, so a grid
    spanned only by the others would leave every difference empty (SmolLM2: sparse reached 1.3 nats, the
    grid began at 1.35). Every method is read at them (all fronts start at the base)."""
    reach = max((p.learning for p in reference), default=0.0)
    reach = min(reach, max((p.learning for f in others for p in f), default=0.0))
    if reach <= 0 or (levels and reach >= levels[0]):
        return []
    return [reach * i / n for i in range(1, n + 1)]


def _front_point(block: Block, p: Point) -> dict[str, Any]:
    if p.label == BASE_POINT.label:
        return {"label": "base", "learning": 0.0, "val": 0.0, "test": 0.0}
    i = int(p.label)
    return {"label": _label(block.recs[i]), "learning": p.learning, "val": p.forgetting,
            "test": _num(block.test[MEAN][i, 0])}  # fmt: skip


def _ordered(keys: list, first: str | None = None) -> list:
    """First appearance order, `first` (if present) at the front."""
    out = list(dict.fromkeys(keys))
    if first in out:
        out.remove(first)
        out.insert(0, first)
    return out


def summarize(aspec: AnalysisSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's numbers as plain JSON-able data (summary.json; the report and plots render it):

    {"spec": {...}, "geometries": {geometry: {"bases": [...], "final": [...], "groups": {group: {
        "methods": [...], "reference": method, "run_sets": {method: n},
        "views": {"main" | "f1": {"learning": text, "levels": [...],
            "matched" | "retention": {method: [cell per level]},
            "per_metric": {template: {method: [cell]}}, "differences": {method: [cell]},
            "fronts": {method: [{"base_seed", "seed", "front": [{"label", "learning", "val", "test"}]}]},
            "points": {method: [[learning, val forgetting, test forgetting], ...]}}}}}}}}
    cell = {"level", "mean", "ci_low", "ci_high", "n_reached", "n_run_sets"} (differences: method minus
    reference, with "excludes_zero"); mean None = no run set reached the level.
    """
    rng = np.random.default_rng(aspec.seed)
    bases, arms = split_records(records)
    blocks = {key: build_block(aspec, bases[key], arms.get(key, []), rng) for key in bases}
    out: dict[str, Any] = {"spec": _spec_json(aspec), "geometries": {}}
    for geometry in _ordered([k[0] for k in bases]):
        gblocks = [b for k, b in blocks.items() if k[0] == geometry]
        run_sets: dict[str, dict[str, dict[tuple, RunSet]]] = defaultdict(lambda: defaultdict(dict))
        for block in gblocks:
            for i, rec in enumerate(block.recs):
                group, method = rec.get("group", DEFAULT_GROUP), rec["method"]
                key = (block.base_seed, rec.get("seed"))
                rs = run_sets[group][method].setdefault(key, RunSet(block, method, rec.get("seed"), []))
                rs.idx.append(i)
        groups = {}
        for group in _ordered(list(run_sets), DEFAULT_GROUP):
            methods = _ordered([r.get("method") for b in gblocks for r in b.recs
                                if r.get("group", DEFAULT_GROUP) == group], aspec.reference)  # fmt: skip
            sets = {m: list(run_sets[group][m].values()) for m in methods}
            views = {}
            for view, (ref, control) in aspec.views().items():
                text = _learning_text(ref, control)
                views[view] = {"learning": text, **_view(aspec, view, methods, sets, rng)}
            groups[group] = {"methods": methods, "reference": methods[0],
                             "run_sets": {m: len(sets[m]) for m in methods}, "views": views}  # fmt: skip
        out["geometries"][geometry] = {
            "bases": [{"base_seed": b.base_seed, "metrics": _columns(aspec, b.base)} for b in gblocks],
            "final": final_points(aspec, gblocks),
            "groups": groups,
        }
    return out


def _learning_text(ref: MetricRef, control: MetricRef | None) -> str:
    return f"gain in {ref}" + (f" minus gain in {control}" if control is not None else "")


def _spec_json(aspec: AnalysisSpec) -> dict[str, Any]:
    opt = {k: None if getattr(aspec, k) is None else str(getattr(aspec, k))
           for k in ("learning", "control", "learning_f1", "control_f1")}  # fmt: skip
    return {**opt, "forgetting": list(aspec.forgetting), "show": [str(r) for r in aspec.show],
            "n_levels": aspec.n_levels, "bootstrap": aspec.bootstrap, "ci": aspec.ci, "seed": aspec.seed,
            "reference": aspec.reference}  # fmt: skip


def columns(aspec: AnalysisSpec) -> list[MetricRef]:
    """The metrics of the final-point table: learning and control, forgetting on test, `show`."""
    refs = [aspec.learning, aspec.control, aspec.learning_f1, aspec.control_f1]
    refs += [template_ref(t, "test") for t in aspec.forgetting]
    return list(dict.fromkeys(r for r in [*refs, *aspec.show] if r is not None))


def _columns(aspec: AnalysisSpec, rec: dict) -> dict[str, float]:
    out = {}
    for ref in columns(aspec):
        try:
            out[str(ref)] = record_value(rec, ref)
        except ValueError:
            continue  # a column this record lacks is shown as "–"
    return out


def final_points(aspec: AnalysisSpec, blocks: list[Block]) -> list[dict[str, Any]]:
    """Per (group, method, params): the last evaluation point of each run, learning, test forgetting and
    the table's metrics averaged over its runs (seeds x base seeds) with their sample std (0 for one)."""
    last: dict[tuple, tuple[Block, int]] = {}
    for block in blocks:
        for i, rec in enumerate(block.recs):
            key = (block.base_seed, rec.get("group", DEFAULT_GROUP), rec["arm"])  # names repeat across groups
            if key not in last or rec["step"] > last[key][0].recs[last[key][1]]["step"]:
                last[key] = (block, i)
    settings: dict[tuple, list[dict]] = defaultdict(list)
    for block, i in last.values():
        rec = block.recs[i]
        values = {"learning": float(block.learning["main"][i]),
                  "forgetting (test)": _num(block.test[MEAN][i, 0]), **_columns(aspec, rec)}  # fmt: skip
        key = (rec.get("group", DEFAULT_GROUP), rec["method"], tuple(sorted(rec["params"].items())))
        settings[key].append({"step": rec["step"], "values": values, "rows": rec.get("rows_per_step")})
    out = []
    for (group, method, params), runs in settings.items():
        keys = [k for k in runs[0]["values"] if all(r["values"].get(k) is not None for r in runs)]
        arr = {k: np.array([r["values"][k] for r in runs], float) for k in keys}
        rows = [r["rows"] for r in runs if r["rows"] is not None]
        out.append({
            "group": group, "method": method, "params": dict(params), "runs": len(runs),
            "step": max(r["step"] for r in runs),
            "mean": {k: float(a.mean()) for k, a in arr.items()},
            "std": {k: float(a.std(ddof=1)) if len(a) > 1 else 0.0 for k, a in arr.items()},
            "rows_per_step": float(np.mean(rows)) if rows else None,
        })  # fmt: skip
    return sorted(out, key=lambda s: (s["group"], s["method"], sorted(s["params"].items(), key=str)))
