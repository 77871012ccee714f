"""The study's figures (matplotlib, headless): learning and forgetting over steps, the learning-forgetting
trade-off with each method's Pareto front, and forgetting at matched learning with its seed spread."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the study runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from titan_mem.checkpoint.files import atomic_file  # noqa: E402
from titan_mem.study.analysis import AVERAGE, Analysis, forgetting_of  # noqa: E402

COLORS = {"sparse": "tab:blue", "full": "tab:red", "lora": "tab:green"}


def _color(method: str) -> str:
    return COLORS.get(method, "tab:gray")


def _save(fig, path: Path) -> Path:
    with atomic_file(path, overwrite=True) as tmp:  # never a half-written figure
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(a: Analysis, path: Path) -> Path:
    """Learning metric and mean held-out forgetting over training steps: one line per method x sweep
    setting (mean over seeds), the base at step 0."""
    series: dict[tuple, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in a.records:
        _, mean = forgetting_of(a.base, rec["metrics"], a.forgetting, rec["arm"])
        key = (rec["method"], tuple(sorted(rec["params"].items())))
        series[key][rec["step"]].append((rec["metrics"][str(a.learning)], mean))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    seen = set()
    for (method, _params), by_step in sorted(series.items()):
        steps = [0, *sorted(by_step)]
        learn = [a.base[str(a.learning)], *(statistics.fmean(v[0] for v in by_step[s]) for s in steps[1:])]
        forget = [0.0, *(100 * statistics.fmean(v[1] for v in by_step[s]) for s in steps[1:])]
        label = method if method not in seen else None
        seen.add(method)
        for ax, ys in ((left, learn), (right, forget)):
            ax.plot(steps, ys, color=_color(method), alpha=0.7, marker=".", label=label)
    left.set(xlabel="finetuning step", ylabel=str(a.learning), title="learning (taught facts)")
    right.set(xlabel="finetuning step", ylabel="held-out metrics worse than base (%)", title="forgetting")
    right.axhline(0, color="black", lw=0.5)
    left.legend()
    return _save(fig, path)


def plot_tradeoff(a: Analysis, path: Path) -> Path:
    """Every evaluation point (all seeds) and each method's Pareto front, pooled over seeds."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in a.methods:
        pts = [p for seed_pts in a.points[method][AVERAGE].values() for p in seed_pts]
        ax.scatter([p.learning for p in pts], [100 * p.forgetting for p in pts], color=_color(method),
                   alpha=0.25, s=14)  # fmt: skip
        front = a.pooled_front(method)
        ax.plot([p.learning for p in front], [100 * p.forgetting for p in front], color=_color(method),
                marker="o", label=f"{method} (Pareto front)")  # fmt: skip
    for level in a.levels:
        ax.axvline(level, color="gray", lw=0.5, ls=":")
    gain = "lower" if not a.learning.higher_is_better else "higher"
    ax.set(xlabel=f"learning: {a.learning} ({gain} is better), gain over base",
           ylabel="forgetting: held-out metrics worse than base (%)",
           title="learning-forgetting trade-off (dotted: matched levels)")  # fmt: skip
    ax.axhline(0, color="black", lw=0.5)
    ax.legend()
    return _save(fig, path)


def plot_matched(a: Analysis, path: Path) -> Path:
    """Forgetting at matched learning per method: mean over seeds, error bar = sample std."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rows in a.matched[AVERAGE].items():
        xs = [r.level for r in rows if r.mean is not None]
        ys = [100 * r.mean for r in rows if r.mean is not None]
        err = [100 * (r.std or 0.0) for r in rows if r.mean is not None]
        ax.errorbar(xs, ys, yerr=err, color=_color(method), marker="o", capsize=3, label=method)
    ax.set(xlabel=f"learning level: gain in {a.learning}", ylabel="forgetting at that level (%)",
           title="forgetting at matched learning (mean ± std over seeds)")  # fmt: skip
    ax.axhline(0, color="black", lw=0.5)
    if a.levels:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "the methods' learning ranges do not overlap", ha="center", transform=ax.transAxes)
    return _save(fig, path)
