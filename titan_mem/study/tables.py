"""Markdown tables of a study's summary (analysis.summarize): every cell carries its interval and how many
run sets it rests on, so a reader never sees a mean without the evidence behind it."""

from __future__ import annotations

from typing import Any


def _pct(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _nats(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"


def cell(c: dict[str, Any], fmt=_pct, unit: str = " %") -> str:
    """A cell, "+3.1 % [+1.2, +5.0]", with "(k/n run sets)" when not every run set reached the level."""
    n, k = c.get("n_run_sets"), c.get("n_reached")
    if c["mean"] is None:
        return f"not reached (0/{n})" if n is not None else "–"
    text = f"{fmt(c['mean'])}{unit}"
    if c["ci_low"] is not None:
        text += f" [{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"
    if n is not None and k != n:
        text += f" ({k}/{n} run sets)"
    return text


def _level(x: float) -> str:
    return f"{x:.4g}"


def matched_table(view: dict[str, Any], by_method: dict[str, list], methods: list[str], fmt=_pct,
                  unit: str = " %") -> list[str]:  # fmt: skip
    """Rows = learning levels, columns = methods."""
    if not view["levels"]:
        return ["The methods' fronts do not span a common learning range: no matched comparison exists."]
    lines = ["| learning level | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for i, level in enumerate(view["levels"]):
        cells = [cell(by_method[m][i], fmt, unit) for m in methods]
        lines.append(f"| {_level(level)} | " + " | ".join(cells) + " |")
    return lines


def differences_table(view: dict[str, Any], methods: list[str], reference: str) -> list[str]:
    """Method minus reference in matched test forgetting (percentage points); bold where the interval
    excludes 0."""
    others = [m for m in methods if m != reference]
    if not others or not view["levels"]:
        return []
    lines = ["| learning level | " + " | ".join(f"{m} − {reference}" for m in others) + " |",
             "|" + "---|" * (len(others) + 1)]  # fmt: skip
    for i, level in enumerate(view["levels"]):
        cells = []
        for m in others:
            c = view["differences"][m][i]
            text = cell(c, _pct, " pp") if c["mean"] is not None else "–"
            cells.append(f"**{text}**" if c.get("excludes_zero") else text)
        lines.append(f"| {_level(level)} | " + " | ".join(cells) + " |")
    return lines


def retention_table(view: dict[str, Any], methods: list[str]) -> list[str]:
    if view["levels"] and all(c["mean"] is None for m in methods for c in view["retention"][m]):
        return ["No taught order in the records (or no per-item learning metric): retention not measured."]
    return matched_table(view, view["retention"], methods, _nats, "")


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def final_table(geo: dict[str, Any], columns: list[str]) -> list[str]:
    """The last evaluation point of every setting (mean ± std over its runs), the base(s) on top."""
    cols = ["learning", "forgetting (test)", *columns]
    lines = ["| group | method | setting | runs | step | rows/step | " + " | ".join(cols) + " |",
             "|" + "---|" * (6 + len(cols))]  # fmt: skip
    for b in geo["bases"]:
        vals = ["0", "0 %", *(_num(b["metrics"].get(c)) for c in columns)]  # the base against itself
        lines.append(f"| base | base (seed {b['base_seed']}) | | | 0 | | " + " | ".join(vals) + " |")
    for s in geo["final"]:
        setting = ", ".join(f"{k}={v}" for k, v in s["params"].items())
        cells = []
        for c in cols:
            mean, std = s["mean"].get(c), s["std"].get(c)
            if mean is None:
                cells.append("–")
            elif c == "forgetting (test)":
                cells.append(f"{100 * mean:+.1f} % ± {100 * std:.1f}")
            else:
                cells.append(f"{mean:.4g} ± {std:.2g}")
        rows = "" if s["rows_per_step"] is None else f"{s['rows_per_step']:.0f}"
        head = f"| {s['group']} | {s['method']} | {setting} | {s['runs']} | {s['step']} | {rows} | "
        lines.append(head + " | ".join(cells) + " |")
    return lines
