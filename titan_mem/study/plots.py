"""The study's figures (matplotlib, headless), one file of each per geometry with a panel per group: the
learning-forgetting plane (every point on test forgetting, each run set's validation-chosen front, the
matched means with their intervals) and forgetting at matched learning with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the study runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from titan_mem.checkpoint.files import atomic_file  # noqa: E402

COLORS = {"sparse": "tab:blue", "full": "tab:red", "lora": "tab:green"}
EXTRA = ["tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def _colors(methods: list[str]) -> dict[str, str]:
    spare = iter(EXTRA * 4)
    return {m: COLORS.get(m) or next(spare, "tab:gray") for m in methods}


def _save(fig, path: Path) -> Path:
    with atomic_file(path, overwrite=True) as tmp:  # never a half-written figure
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n: int):
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), squeeze=False)
    return fig, list(axes[0])


def _err(rows: list[dict[str, Any]]) -> tuple[list, list, list]:
    xs, ys, err = [], [], [[], []]
    for r in rows:
        if r["mean"] is None:
            continue
        xs.append(r["level"])
        ys.append(100 * r["mean"])
        lo = r["ci_low"] if r["ci_low"] is not None else r["mean"]
        hi = r["ci_high"] if r["ci_high"] is not None else r["mean"]
        err[0].append(100 * max(r["mean"] - lo, 0.0))
        err[1].append(100 * max(hi - r["mean"], 0.0))
    return xs, ys, err


def plot_tradeoff(geometry: str, groups: dict[str, Any], path: Path, view: str = "main") -> Path:
    """Per group: all points (learning, test forgetting), each run set's front (chosen on validation)
    drawn on test forgetting, and the matched means with intervals."""
    fig, axes = _panels(len(groups))
    for ax, (group, g) in zip(axes, groups.items()):
        v, colors = g["views"][view], _colors(g["methods"])
        for m in g["methods"]:
            pts = [p for p in v["points"][m] if p[2] is not None]
            ax.scatter([p[0] for p in pts], [100 * p[2] for p in pts], color=colors[m], alpha=0.2, s=10)
            for rs in v["fronts"][m]:
                f = [p for p in rs["front"] if p["test"] is not None]
                ax.plot([p["learning"] for p in f], [100 * p["test"] for p in f], color=colors[m], alpha=0.4,
                        lw=0.8)  # fmt: skip
            xs, ys, err = _err(v["matched"][m])
            ax.errorbar(xs, ys, yerr=err, color=colors[m], marker="o", capsize=3, lw=2, label=m)
        for level in v["levels"]:
            ax.axvline(level, color="gray", lw=0.5, ls=":")
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xlabel=f"learning: {v['learning']}", ylabel="test forgetting: held-out worse than base (%)",
               title=f"{geometry} / {group}: validation-chosen fronts, on test (thin: run sets)")  # fmt: skip
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_matched(geometry: str, groups: dict[str, Any], path: Path, view: str = "main",
                 ci: float = 0.95) -> Path:  # fmt: skip
    """Per group: matched test forgetting per method with its bootstrap interval (methods offset a little
    along x so the bars do not hide each other)."""
    fig, axes = _panels(len(groups))
    for ax, (group, g) in zip(axes, groups.items()):
        v, colors = g["views"][view], _colors(g["methods"])
        levels = v["levels"]
        step = (levels[-1] - levels[0]) / max(len(levels) - 1, 1) if len(levels) > 1 else 1.0
        for j, m in enumerate(g["methods"]):
            xs, ys, err = _err(v["matched"][m])
            shift = (j - (len(g["methods"]) - 1) / 2) * 0.06 * step
            xs = [x + shift for x in xs]
            ax.errorbar(xs, ys, yerr=err, color=colors[m], marker="o", capsize=3, label=m)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xlabel=f"learning level: {v['learning']}", ylabel="test forgetting at that level (%)",
               title=f"{geometry} / {group}: matched forgetting ({100 * ci:.0f} % bootstrap CI)")  # fmt: skip
        if levels:
            ax.legend(fontsize=8)
        else:
            note = "the methods' learning ranges do not overlap"
            ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
    return _save(fig, path)
