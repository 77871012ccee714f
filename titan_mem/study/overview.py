"""The study's report: the analysis (analysis.py / report.py) of its records, plus what only the study knows
-- each memory geometry's statistics (reads per token against slots, t against slots, the background df
histogram, how busy and how many the selected rows are) and every arm's resolved settings."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from titan_mem.study.analysis import AnalysisSpec
from titan_mem.study.geometry import counts_stats
from titan_mem.study.spec import StudySpec
from titan_mem.study.stages import BaseKey, Layout, base_keys


def analysis_spec(spec: StudySpec) -> AnalysisSpec:
    return AnalysisSpec(
        learning=spec.learning,
        control=spec.control,
        learning_f1=spec.learning_f1,
        control_f1=spec.control_f1,
        forgetting=tuple(spec.forgetting),
        show=tuple(spec.show),
        n_levels=spec.levels,
        bootstrap=spec.bootstrap,
    )


def _model_memory(spec: StudySpec, layout: Layout, key: BaseKey) -> tuple[int, int] | None:
    """(reads per token, slots) of a base's memory layer, from its run's resolved config (a retrofit's:
    the healing run's, whose memory is the retrofit's)."""
    retrofit = bool(spec.geometry(key.geometry).retrofit)
    path = (layout.heal_run(key) if retrofit else layout.base_run(key)) / "config.json"
    if not path.is_file():
        return None
    from titan_mem import config as config_mod
    from titan_mem.hf.retrofit import model_args_for

    mem = model_args_for(config_mod.load_run_config(path), 1).memory
    return mem.heads * mem.topk, mem.n_keys**2


def geometry_lines(spec: StudySpec, layout: Layout, records: list[dict[str, Any]]) -> list[str]:
    """One table per geometry: memory shape and background statistics (base seed 0's counts), and per
    sparse series the rows it updated (means over its arms' final records)."""
    lines = [
        "| geometry | slots | reads/token | reads/token ÷ slots | background | median df/N | never read "
        "| read by > 50 % of batches |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in base_keys(spec):
        if key.seed != spec.base_seeds[0]:
            continue
        mem = _model_memory(spec, layout, key)
        for counts in sorted(layout.base_files(key).glob("counts-*.safetensors")):
            st = counts_stats(counts)
            hist = st["df_histogram"]
            reads = f"{mem[0]}" if mem else "?"
            ratio = f"{mem[0] / mem[1]:.2e}" if mem else "?"
            lines.append(
                f"| {key.geometry} | {st['slots']:,} | {reads} | {ratio} | {counts.stem[len('counts-') :]} "
                f"| {st['median_df_frac']:.3f} | {100 * hist['never read']:.1f} % "
                f"| {100 * hist['(50 %, 100 %]']:.1f} % |"
            )
    lines += [
        "",
        "| geometry | group | series | t ÷ slots | rows/step | union of rows updated (share of table) "
        "| selected rows read by > 50 % of background batches | selected rows with idf 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    last: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        run = (rec["geometry"], rec["group"], rec["arm"])  # arm names repeat across geometries and groups
        if "selection" in rec and (run not in last or rec["step"] > last[run]["step"]):
            last[run] = rec
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in last.values():
        groups.setdefault((rec["geometry"], rec["group"], rec["method"]), []).append(rec)
    order = {g.name: i for i, g in enumerate(spec.geometries)}
    for (geometry, group, series), recs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])
    ):
        sel = [r["selection"] for r in recs]
        slots = recs[0]["selection"].get("slots", 0)
        t = statistics.fmean(r["resolved"]["finetune"].get("top_t", 0) for r in recs)
        has_counts = all("slots" in s for s in sel)  # tf / all arms read no counts: no background stats

        def pct(key: str, sel: list = sel, has_counts: bool = has_counts) -> str:
            vals = [s.get(key) for s in sel]
            return f"{100 * statistics.fmean(v or 0 for v in vals):.1f} %" if has_counts else "–"

        union = statistics.fmean(s["union_rows"] for s in sel)
        share = f" ({100 * statistics.fmean(s['union_frac'] for s in sel):.2f} %)" if has_counts else ""
        lines.append(
            f"| {geometry} | {group} | {series} | {f'{t / slots:.2e}' if slots else '–'} "
            f"| {statistics.fmean(s['rows_per_step'] for s in sel):.0f} | {union:,.0f}{share} "
            f"| {pct('selected_read_by_most')} | {pct('selected_idf0_frac')} |"
        )
    return lines


def settings_lines(records: list[dict[str, Any]]) -> list[str]:
    """Each series' resolved optimizer, schedule and clipping (one line per distinct setting)."""
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        if "resolved" in rec:
            r = rec["resolved"]
            o, s = r["optimizer"], r["lr_scheduler"]
            key = json.dumps([rec["group"], rec["method"], o["name"], o.get("weight_decay"), r["max_norm"],
                              s["warmup_steps"], s["decay_type"], r["steps"], r["batch"]])  # fmt: skip
            seen[key] = rec
    lines = [
        "| group | series | optimizer | weight decay (dense / memory) | momentum | clip | warmup "
        "| schedule | steps | batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in seen.values():
        r = rec["resolved"]
        o, s = r["optimizer"], r["lr_scheduler"]
        lines.append(
            f"| {rec['group']} | {rec['method']} | {o['name']} | {o.get('weight_decay')} / "
            f"{o.get('memory_weight_decay')} | {o.get('momentum')} | {r['max_norm']} | {s['warmup_steps']} "
            f"| {s['decay_type']} | {r['steps']} | {r['batch'][0]} x {r['batch'][1]} |"
        )
    return lines


def write_study_report(spec: StudySpec, layout: Layout, records: list[dict[str, Any]]) -> Path:
    from titan_mem.study.report import write_report

    extra = {
        "Memory geometry and selection": geometry_lines(spec, layout, records),
        "Resolved settings of every series": settings_lines(records),
    }
    return write_report(analysis_spec(spec), records, layout.root, title=f"Study `{spec.name}`", extra=extra)
