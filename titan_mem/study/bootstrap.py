"""Percentile bootstrap for the study, vectorised: a replicate is a vector of *counts* (how often each item,
or run set, was drawn), so an aggregate of every evaluation point under every replicate is one matrix
product, and items are resampled once per replicate for all points (paired across methods).

Column 0 of every count matrix is all ones: the point estimate goes through the same arithmetic as the
replicates, so the reported number and its interval cannot come from different code.
"""

from __future__ import annotations

import numpy as np


def cluster_index(groups: list | None, n: int) -> np.ndarray:
    """Cluster of each item: its "group" (a person: their facts are drawn together) when items have one,
    else the item itself."""
    if groups is None:
        return np.arange(n)
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return inverse.reshape(-1)


def item_counts(clusters: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(n_items, 1 + replicates): column 0 ones, then for each replicate how often each item is drawn when
    its clusters are resampled with replacement."""
    n_clusters = int(clusters.max()) + 1 if clusters.size else 0
    out = np.ones((clusters.size, replicates + 1))
    if replicates and n_clusters:
        drawn = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=replicates)
        out[:, 1:] = drawn[:, clusters].T
    return out


def weighted_means(values: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sum(c w v) / sum(c w) for every row of values/weights (points x items) and every column of counts
    (items x replicates): (points x replicates); nan where a replicate drew no weight."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((values * weights) @ counts) / (weights @ counts)


def run_set_counts(k: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, k): how often each of k run sets is drawn per replicate (with replacement)."""
    if k == 0 or replicates == 0:
        return np.zeros((replicates, k))
    return rng.multinomial(k, np.full(k, 1.0 / k), size=replicates).astype(float)


def resampled_mean(values: np.ndarray, counts: np.ndarray) -> tuple[float | None, np.ndarray]:
    """values: (run sets, 1 + replicates), column b + 1 read under item replicate b; counts: (replicates,
    run sets). The mean over run sets (point estimate, column 0) and one mean per replicate (run set b
    drawn counts[b] times, read at its replicate-b value). Non-finite values (nothing to measure) are
    left out of both; a replicate with nothing left is nan."""
    est = values[:, 0]
    ok = np.isfinite(est)
    point = float(est[ok].mean()) if ok.any() else None
    reps = values[:, 1:].T  # (replicates, run sets)
    finite = np.isfinite(reps)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = (counts * np.where(finite, reps, 0.0)).sum(axis=1)
        den = (counts * finite).sum(axis=1)
        return point, num / den


def percentile_ci(replicates: np.ndarray, ci: float) -> tuple[float | None, float | None]:
    """The percentile interval at level `ci` over the finite replicates; (None, None) without any."""
    reps = replicates[np.isfinite(replicates)]
    if reps.size == 0:
        return None, None
    lo, hi = np.quantile(reps, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)
