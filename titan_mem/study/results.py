"""A study's numbers: one record per arm x evaluation point, read from each run's `metrics.jsonl`
(in-loop evaluation logs `eval/<task>/<metric>`) and the base evaluation, kept in `results.jsonl`.

    {"arm": "sparse-lr20-...-seed0", "method": "sparse", "params": {"lr": 20.0, ...}, "seed": 0,
     "step": 40, "metrics": {"synthetic_qa/new_taught:em": 0.2, ...}, "rows_per_step": 12.5}

The base is the record with arm "base", method "base", step 0.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from titan_mem.study.spec import Arm

EVAL_PREFIX = "eval/"


def metric_key(task: str, metric: str) -> str:
    """The study's name of one number, as in study files: `task:metric`."""
    return f"{task}:{metric}"


def arm_records(arm: Arm, run_dir: Path) -> list[dict[str, Any]]:
    """The arm's evaluation points from its run's metrics.jsonl (sorted by step; a step logged twice,
    after a resume, keeps its last record)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        evals = {k[len(EVAL_PREFIX) :]: v for k, v in rec.items() if k.startswith(EVAL_PREFIX)}
        if evals:
            by_step[int(rec["step"])] = {
                metric_key(*name.rsplit("/", 1)): float(v) for name, v in evals.items()
            }
    rows = _rows_per_step(run_dir / "selected_slots.jsonl")
    return [
        {
            "arm": arm.name,
            "method": arm.method,
            "params": dict(arm.params),
            "seed": arm.seed,
            "step": step,
            "metrics": metrics,
            **({"rows_per_step": rows} if rows is not None else {}),
        }
        for step, metrics in sorted(by_step.items())
    ]


def _rows_per_step(selection_log: Path) -> float | None:
    """Mean value rows a sparse run updated per step (what an adaptive-t rule chose)."""
    if not selection_log.is_file():
        return None
    counts = [json.loads(ln)["slots_selected"] for ln in selection_log.read_text().splitlines() if ln.strip()]
    return statistics.fmean(counts) if counts else None


def base_record(base_eval: dict[str, Any]) -> dict[str, Any]:
    """The base evaluation document (tools/evaluate.py's results JSON) as the study's step-0 record."""
    metrics = {metric_key(m["task"], m["metric"]): float(m["value"]) for m in base_eval["results"]}
    return {"arm": "base", "method": "base", "params": {}, "seed": None, "step": 0, "metrics": metrics}


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def split_base(records: Iterable[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(the base's metrics, the arms' records); a results file without a base record is refused."""
    base, arms = None, []
    for rec in records:
        if rec["arm"] == "base":
            base = rec["metrics"]
        else:
            arms.append(rec)
    if base is None:
        raise ValueError("results: no base record (arm 'base'); the study's base evaluation is missing")
    return base, arms
