"""A study's per-item records: reading one number from a record (from its items, as the evaluator
aggregates them), aligning a metric's items across the records that share a base, the stable
validation/test split of items, and grouping records by their base."""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from titan_mem.errors import DataError
from titan_mem.study import bootstrap as bs
from titan_mem.study.spec import MetricRef

SPLIT = "{split}"
# where a record lacks the new fields (an older results file): one geometry, one base, one group
DEFAULT_GEOMETRY, DEFAULT_GROUP = "default", "headline"


def template_ref(template: str, split: str | None) -> MetricRef:
    """The metric a template names on a split ("val" / "test"); a template without "{split}" names one
    task whatever the split (its items are split by hash)."""
    task, _, metric = template.rpartition(":")
    return MetricRef(task.replace(SPLIT, split) if split else task, metric)


def is_weighted(metric: str) -> bool:
    """NLLs average over answer tokens (a long answer counts for its tokens); scores average over items."""
    return metric.endswith("nll")


def is_validation(key: Any) -> bool:
    """Stable across runs and machines (not Python's salted hash): even crc32 = validation, odd = test."""
    return zlib.crc32(str(key).encode()) % 2 == 0


def validation_mask(items: dict[str, list]) -> np.ndarray:
    """Which items are validation. Keyed by "group" when items have one, so one person's facts never
    straddle the two splits; else by id."""
    keys = items.get("group") or items["id"]
    return np.fromiter((is_validation(k) for k in keys), bool, len(keys))


def aggregate(items: dict[str, list], metric: str) -> float:
    """A task's metric from its items: token-weighted for NLLs, a plain mean otherwise (as the evaluator
    aggregates, so this equals the record's `metrics` value)."""
    v = np.asarray(items[metric], float)
    w = np.asarray(items["tokens"], float) if is_weighted(metric) else np.ones_like(v)
    return float((v * w).sum() / w.sum())


def record_value(rec: dict[str, Any], ref: MetricRef) -> float:
    """One number of a record: from its items when it has them, else its aggregate."""
    items = (rec.get("items") or {}).get(ref.task)
    if items is not None and ref.metric in items:
        return aggregate(items, ref.metric)
    if str(ref) in rec.get("metrics", {}):
        return float(rec["metrics"][str(ref)])
    raise DataError(f"results: {where(rec)} has no metric {ref} (is its task in eval.tasks?)")


def where(rec: dict[str, Any]) -> str:
    if rec["arm"] == "base":
        return f"the base of geometry {rec.get('geometry')!r} base_seed {rec.get('base_seed')}"
    return f"arm {rec['arm']} step {rec['step']}"


@dataclass
class ItemMatrix:
    """One metric over one set of items for a base and every point compared to it, aligned to the
    base's item order: values and weights (points x items)."""

    base_v: np.ndarray
    base_w: np.ndarray
    v: np.ndarray
    w: np.ndarray
    ids: list
    groups: list | None

    def subset(self, mask: np.ndarray) -> ItemMatrix:
        groups = None if self.groups is None else [g for g, m in zip(self.groups, mask) if m]
        return ItemMatrix(self.base_v[mask], self.base_w[mask], self.v[:, mask], self.w[:, mask],
                          [i for i, m in zip(self.ids, mask) if m], groups)  # fmt: skip

    def means(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base: replicates, points: points x replicates) under item counts (items x replicates)."""
        base = bs.weighted_means(self.base_v[None], self.base_w[None], counts)[0]
        return base, bs.weighted_means(self.v, self.w, counts)


def item_matrix(base: dict[str, Any], recs: list[dict[str, Any]], ref: MetricRef) -> ItemMatrix:
    def arrays(rec: dict[str, Any]) -> tuple[dict, np.ndarray, np.ndarray]:
        items = (rec.get("items") or {}).get(ref.task)
        if items is None or ref.metric not in items:
            raise DataError(f"results: {where(rec)} has no per-item {ref} (the analysis resamples items)")
        v = np.asarray(items[ref.metric], float)
        w = np.asarray(items["tokens"], float) if is_weighted(ref.metric) else np.ones_like(v)
        return items, v, w

    b, base_v, base_w = arrays(base)
    ids, n = b["id"], len(b["id"])
    v, w = np.empty((len(recs), n)), np.empty((len(recs), n))
    pos = None
    for i, rec in enumerate(recs):
        items, v[i], w[i] = arrays(rec)
        if items["id"] != ids:  # another order (or other items): align to the base's
            pos = pos or {str(x): j for j, x in enumerate(ids)}
            idx = [pos.get(str(x), -1) for x in items["id"]]
            if len(idx) != n or sorted(idx) != list(range(n)):
                raise DataError(f"results: {where(rec)}: the items of {ref.task} are not its base's")
            v[i, idx], w[i, idx] = v[i].copy(), w[i].copy()
    return ItemMatrix(base_v, base_w, v, w, list(ids), b.get("group"))


def thirds(order: list, pos: dict[str, int]) -> tuple[list[int], list[int]]:
    """Item indices (`pos`: id -> index) of the earliest and the latest third of the taught facts, by the
    first time the stream taught each; ids the task does not score are skipped."""
    seen: dict[int, None] = {}
    for x in order:
        j = pos.get(str(x))
        if j is not None:
            seen.setdefault(j)
    taught = list(seen)
    k = len(taught) // 3
    return (taught[:k], taught[-k:]) if k else ([], [])


def split_records(records: list[dict]) -> tuple[dict[tuple, dict], dict[tuple, list[dict]]]:
    """Bases by (geometry, base_seed) and the arm records compared to each; an arm without its base, or
    two bases for one key, is refused."""
    bases: dict[tuple, dict] = {}
    arms: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        key = (rec.get("geometry", DEFAULT_GEOMETRY), rec.get("base_seed", 0))
        if rec["arm"] == "base":
            if key in bases:
                raise DataError(f"results: two base records for geometry {key[0]!r} base_seed {key[1]}")
            bases[key] = rec
        else:
            arms[key].append(rec)
    for key in arms:
        if key not in bases:
            raise DataError(f"results: no base record for geometry {key[0]!r} base_seed {key[1]} "
                             f"(arm {arms[key][0]['arm']}, ...): its base evaluation is missing")  # fmt: skip
    if not bases:
        raise DataError("results: no base record (arm 'base'); the study's base evaluation is missing")
    return bases, arms
