"""`report.md`, `summary.json` and the PNG plots of a study, from its records (rerun alone with
`--report-only`). The report renders `analysis.summarize`; summary.json holds the same numbers exactly, so
docs quote them instead of copying rounded cells."""

from __future__ import annotations

import datetime
import json
import math
import platform
import re
from pathlib import Path
from typing import Any

from titan_mem.checkpoint.files import atomic_file
from titan_mem.study.analysis import AnalysisSpec, columns, summarize
from titan_mem.study.plots import plot_matched, plot_tradeoff
from titan_mem.study.tables import differences_table, final_table, matched_table, retention_table


def _clean(x: Any) -> Any:
    """Strict JSON: a non-finite float (nothing measured) becomes null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _how_to_read(aspec: AnalysisSpec, s: dict[str, Any]) -> list[str]:
    spec = s["spec"]
    views = [f"`{aspec.learning}`" + (f" minus the gain in `{aspec.control}`" if aspec.control else "")]
    if aspec.learning_f1:
        views.append(f"`{aspec.learning_f1}`" + (f" minus `{aspec.control_f1}`" if aspec.control_f1 else ""))
    return [
        f"**Learning** of an evaluation point: its gain over its own base in {views[0]} (specific learning: "
        "a method that lowers taught and untaught answers alike learns 0)"
        + (f"; the F1 view uses {views[1]}." if len(views) > 1 else "."),
        "**Forgetting**: the mean over "
        + ", ".join(f"`{t}`" for t in aspec.forgetting)
        + " of each metric's relative worsening against the base (+10 % = 10 % worse; negative = "
        "improved). `{split}` tasks have their own validation/test tasks; the others are split by a "
        "stable hash of the item (person) id.",
        "**Fronts** are chosen per run set (method × geometry × group × base seed × seed, over all its "
        "configs and steps) on *validation* forgetting, anchored at the base, and read on *test* forgetting "
        "at learning levels at least two methods' pooled fronts span, plus levels within the reference's "
        "reach when it reaches none of those (linear interpolation, no extrapolation).",
        f"**Intervals**: {100 * spec['ci']:.0f} % percentile bootstrap, {spec['bootstrap']} replicates "
        f"(seed {spec['seed']}), resampling run sets and test items (by person where items have one) and "
        "re-reading the same validation-chosen points; differences are paired over items. A cell says "
        "(k/n run sets) when not every run set's front reached the level; bold differences exclude 0.",
    ]


def _group_section(aspec: AnalysisSpec, group: str, g: dict[str, Any]) -> list[str]:
    methods, ref = g["methods"], g["reference"]
    main = g["views"]["main"]
    sets = ", ".join(f"{m} {n}" for m, n in g["run_sets"].items())
    lines = [f"### Group `{group}`", "", f"Run sets: {sets}. Learning: {main['learning']}.", "",
             "#### Test forgetting at matched learning", "",
             *matched_table(main, main["matched"], methods), ""]  # fmt: skip
    diff = differences_table(main, methods, ref)
    if diff:
        lines += [f"#### Difference vs `{ref}` (percentage points of test forgetting)", "", *diff, ""]
    f1 = g["views"].get("f1")
    if f1 is not None:
        lines += ["#### F1-matched view", "", f"Learning: {f1['learning']}.", "",
                  *matched_table(f1, f1["matched"], methods), ""]  # fmt: skip
        diff = differences_table(f1, methods, ref)
        lines += [*diff, ""] if diff else []
    if not main["levels"]:
        return lines  # nothing is read at matched levels: retention and per-metric tables would be empty
    lines += ["#### Retention along the stream", "",
              "Mean per-fact gain (vs base) of the earliest-taught third minus the latest-taught third, "
              "at the same fronts and levels (negative = facts taught early were lost more).", "",
              *retention_table(main, methods), "",
              "#### Per held-out metric (test), at the same fronts", ""]  # fmt: skip
    for t in aspec.forgetting:
        lines += [f"`{t}`", "", *matched_table(main, main["per_metric"][t], methods), ""]
    return lines


def write_report(aspec: AnalysisSpec, records: list[dict[str, Any]], out_dir: Path, title: str,
                 extra: dict[str, list[str]] | None = None) -> Path:  # fmt: skip
    """Analyse `records` (results.jsonl's lines: bases and arm points) and write report.md, summary.json
    and per geometry tradeoff_<geometry>.png and matched_<geometry>.png into `out_dir`. `extra`: more
    sections (title -> markdown lines), inserted after the introduction."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summarize(aspec, records)
    with atomic_file(out_dir / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(_clean(s), indent=1, allow_nan=False))
    arms = [r for r in records if r["arm"] != "base"]
    base_seeds = sorted({r.get("base_seed") for r in arms}, key=str)
    seeds = sorted({r.get("seed") for r in arms}, key=str)
    lines = [
        f"# {title}",
        "",
        f"{len({r['arm'] for r in arms})} arms, {len(arms)} evaluation points, {len(records) - len(arms)} "
        f"bases; geometries {', '.join(f'`{g}`' for g in s['geometries'])}; base seeds {base_seeds}, "
        f"seeds {seeds}. "
        f"Report written {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}; "
        "exact numbers in `summary.json`.",
        "",
        *(f"- {t}" for t in _how_to_read(aspec, s)),
        "",
    ]
    for name, body in (extra or {}).items():
        lines += [f"## {name}", "", *body, ""]
    cols = [str(r) for r in columns(aspec)]
    for geometry, geo in s["geometries"].items():
        lines += [f"## Geometry `{geometry}`", ""]
        if geo["groups"]:
            slug = _slug(geometry)
            trade = plot_tradeoff(geometry, geo["groups"], out_dir / f"tradeoff_{slug}.png")
            matched = plot_matched(geometry, geo["groups"], out_dir / f"matched_{slug}.png", ci=aspec.ci)
            lines += [f"![matched forgetting, {geometry}]({matched.name})", "",
                      f"![learning-forgetting plane, {geometry}]({trade.name})", ""]  # fmt: skip
        for group, g in geo["groups"].items():
            lines += _group_section(aspec, group, g)
        lines += [f"### Final point of each setting, `{geometry}` (mean ± std over runs)", "",
                  "Metric columns: the test task of a `{split}` template, all items of the others.", "",
                  *final_table(geo, cols), ""]  # fmt: skip
    path = out_dir / "report.md"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines))
    return path
