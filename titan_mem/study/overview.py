"""The study's report: the analysis (analysis.py / report.py) of its records, plus what only the study knows
-- each memory geometry's statistics (reads per token against slots, t against slots, the background df
histogram, how busy and how many the selected rows are) and every arm's resolved settings."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from titan_mem.study import bootstrap as bs
from titan_mem.study.analysis import AnalysisSpec
from titan_mem.study.geometry import counts_stats
from titan_mem.study.items import item_matrix, record_value
from titan_mem.study.results import healed_records
from titan_mem.study.spec import MetricRef, StudySpec
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


def _paired_change(base: dict, healed: dict, ref: MetricRef, replicates: int) -> tuple[float, float, float]:
    """Relative change healed vs base of one metric over the same items, with a 95 % paired bootstrap
    interval (items resampled together in both)."""
    m = item_matrix(base, [healed], ref)
    counts = bs.item_counts(bs.cluster_index(m.groups, len(m.ids)), replicates, np.random.default_rng(0))
    b, h = m.means(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = 100 * (h[0] - b) / np.abs(b)
    lo, hi = bs.percentile_ci(rel[1:], 0.95)
    return float(rel[0]), lo if lo is not None else float("nan"), hi if hi is not None else float("nan")


def heal_lines(spec: StudySpec, layout: Layout, records: list[dict[str, Any]]) -> list[str]:
    """What the retrofit itself costs (reference = "hf"): each metric of the healed model against the HF
    model as it is, per base seed, on the same items (Goyal et al. 2026: the retrofit keeps base skills)."""
    lines = [
        "Relative change (NLL: up is worse; F1, acc: down is worse); 95 % paired bootstrap interval, items.",
        "",
        "| geometry | base seed | metric | HF model | healed | change [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    refs = [spec.learning, *(r for r in [spec.control] if r), *(MetricRef(*t.rsplit(":", 1)) for t in
            spec.forgetting if "{split}" not in t)]  # fmt: skip
    for key in base_keys(spec):
        healed = healed_records(layout, key)
        base = next((r for r in records if r["arm"] == "base" and r["geometry"] == key.geometry
                     and r["base_seed"] == key.seed), None)  # fmt: skip
        if not healed or base is None:
            continue
        for ref in refs:
            try:
                mid, lo, hi = _paired_change(base, healed[0], ref, spec.bootstrap)
            except ValueError:  # a metric without per-item scores
                continue
            before, after = record_value(base, ref), record_value(healed[0], ref)
            lines.append(f"| {key.geometry} | {key.seed} | {ref} | {before:.4g} | {after:.4g} "
                         f"| {mid:+.1f} % [{lo:+.1f}, {hi:+.1f}] |")  # fmt: skip
    return lines if len(lines) > 4 else []


def write_study_report(spec: StudySpec, layout: Layout, records: list[dict[str, Any]]) -> Path:
    from titan_mem.study.report import write_report

    extra = {
        "Memory geometry and selection": geometry_lines(spec, layout, records),
        "Resolved settings of every series": settings_lines(records),
    }
    if spec.reference == "hf":
        extra["The retrofit's own cost: healed model vs the HF model as it is"] = heal_lines(
            spec, layout, records
        )
    return write_report(analysis_spec(spec), records, layout.root, title=f"Study `{spec.name}`", extra=extra)
