"""`report.md` and the PNG plots of a study, from its `results.jsonl` (rerun alone with `--report-only`)."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

from titan_mem.checkpoint.files import atomic_file
from titan_mem.study.analysis import AVERAGE, Analysis, analyze, arm_summaries
from titan_mem.study.frontier import Matched
from titan_mem.study.plots import plot_curves, plot_matched, plot_tradeoff
from titan_mem.study.results import read_results, split_base
from titan_mem.study.spec import StudySpec


def _num(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f} %" if pct else f"{x:.4g}"


def _matched_cell(m: Matched) -> str:
    if m.mean is None:
        return f"not reached (0/{m.n_seeds})"
    reached = "" if m.n_reached == m.n_seeds else f" ({m.n_reached}/{m.n_seeds} seeds)"
    return f"{100 * m.mean:+.1f} % ± {100 * (m.std or 0):.1f}{reached}"


def matched_table(a: Analysis, name: str = AVERAGE) -> list[str]:
    if not a.levels:
        return ["The methods' fronts do not span a common learning range: no matched comparison exists."]
    head = f"| learning gain ({a.learning}) | " + " | ".join(a.methods) + " |"
    lines = [head, "|" + "---|" * (len(a.methods) + 1)]
    for i, level in enumerate(a.levels):
        cells = [_matched_cell(a.matched[name][m][i]) for m in a.methods]
        lines.append(f"| {level:.4g} | " + " | ".join(cells) + " |")
    return lines


def arms_table(a: Analysis) -> list[str]:
    cols = [str(a.learning), *(str(r) for r in a.forgetting), *(str(r) for r in a.show)]
    lines = [
        "| method | setting | seeds | step | rows/step | " + " | ".join(cols) + " |",
        "|" + "---|" * (5 + len(cols)),
        "| base | | | 0 | | " + " | ".join(_num(a.base.get(c)) for c in cols) + " |",
    ]
    for s in sorted(arm_summaries(a.records), key=lambda s: (s["method"], sorted(s["params"].items()))):
        setting = ", ".join(f"{k}={v}" for k, v in s["params"].items())
        cells = []
        for c in cols:
            mean, std = s["mean"].get(c), s["std"].get(c)
            cells.append("–" if mean is None else f"{mean:.4g} ± {std:.2g}")
        rows = "" if s["rows_per_step"] is None else f"{s['rows_per_step']:.0f}"
        head = f"| {s['method']} | {setting} | {s['seeds']} | {s['step']} | {rows} | "
        lines.append(head + " | ".join(cells) + " |")
    return lines


def write_report(spec: StudySpec, results: Path, out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    """Analyse `results` and write report.md + curves.png, tradeoff.png, matched.png into `out_dir`."""
    base, records = split_base(read_results(results))
    a = analyze(spec, base, records)
    plots = {
        "curves": plot_curves(a, out_dir / "curves.png"),
        "tradeoff": plot_tradeoff(a, out_dir / "tradeoff.png"),
        "matched": plot_matched(a, out_dir / "matched.png"),
    }
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"# Study `{spec.name}`",
        "",
        f"Study file `{spec.path}`; {len({r['arm'] for r in records})} finished arms, seeds {seeds}; "
        f"report written {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.processor() or platform.machine()}).",
        "",
        f"Learning: `{spec.learning}` (gain over the base). Forgetting: relative worsening of "
        + ", ".join(f"`{r}`" for r in spec.forgetting)
        + " against the base, averaged (0 % = no forgetting, negative = improved). Every evaluation point of "
        "every arm is a point; a method's front is per seed over its sweep and training length.",
        "",
        "## Forgetting at matched learning (mean held-out metrics)",
        "",
        *matched_table(a),
        "",
        f"![forgetting at matched learning]({plots['matched'].name})",
        "",
        "## Trade-off and Pareto fronts",
        "",
        f"![learning-forgetting trade-off]({plots['tradeoff'].name})",
        "",
        "## Per held-out metric, at the same levels",
        "",
    ]
    for ref in spec.forgetting:
        lines += [f"### `{ref}`", "", *matched_table(a, str(ref)), ""]
    lines += [
        "## Final point of each setting (mean ± std over seeds)",
        "",
        *arms_table(a),
        "",
        f"![learning and forgetting over steps]({plots['curves'].name})",
        "",
    ]
    path = out_dir / "report.md"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines))
    return path
