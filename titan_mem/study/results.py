"""A study's numbers: one record per (base | arm) x evaluation point, kept in `results.jsonl`. Each holds the
aggregates the trainer logged (`metrics`, from metrics.jsonl's `eval/<task>/<metric>`) and the per-item
scores (`items`, from eval_items.jsonl) the analysis bootstraps over:

    {"arm": "sparse-lr20.0-b0-seed1", "method": "sparse", "base_method": "sparse", "group": "headline",
     "params": {"lr": 20.0}, "geometry": "1M", "base_seed": 0, "seed": 1, "step": 16,
     "metrics": {"synthetic_qa/new_taught:answer_nll": 3.9, ...}, "items": {TASK: {"id": [...], ...}},
     "taught_order": [...], "resolved": {"optimizer": {...}, ...}, "selection": {...}, "rows_per_step": 50.0}

A base is the record with arm "base", method "base", group "base", step 0, seed None, for its geometry and
base seed. `resolved` is the arm's own optimizer, schedule, clipping and finetuning keys as its run
resolved them (docs/design.md, "Same budget, own best settings": every arm's resolved optimizer goes
into the results).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from titan_mem.eval.items import read_items
from titan_mem.study.geometry import selection_stats
from titan_mem.study.spec import Arm
from titan_mem.study.stages import BaseKey, Layout

EVAL_PREFIX = "eval/"


def metric_key(task: str, metric: str) -> str:
    """The study's name of one number, as in study files: `task:metric`."""
    return f"{task}:{metric}"


def resolved_settings(run_dir: Path) -> dict[str, Any]:
    """What an arm actually trained with, from its run's resolved config.json."""
    cfg = json.loads((run_dir / "config.json").read_text())
    training = cfg["training"]
    return {
        "mode": training["mode"],
        "steps": training["steps"],
        "max_norm": training["max_norm"],
        "batch": [training["global_batch_size"], training["seq_len"]],
        "optimizer": cfg["optimizer"],
        "lr_scheduler": cfg["lr_scheduler"],
        "finetune": cfg["finetune"] if training["mode"] != "full_finetune" else {},
    }


def _taught_order(run_dir: Path) -> list[str]:
    from titan_mem import config as config_mod
    from titan_mem.data.facts_order import taught_fact_order

    cfg = config_mod.load_run_config(run_dir / "config.json")
    return taught_fact_order(cfg.data) if cfg.data.regime == "facts" else []


def arm_records(arm: Arm, run_dir: Path) -> list[dict[str, Any]]:
    """The arm's evaluation points (sorted by step; a step logged twice, after a resume, keeps its last)."""
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
    items_file = run_dir / "eval_items.jsonl"
    items = read_items(items_file) if items_file.is_file() else {}
    resolved = resolved_settings(run_dir)
    selection = selection_stats(
        run_dir / "selected_slots.jsonl", resolved["finetune"].get("background_counts")
    )
    common: dict[str, Any] = {
        "arm": arm.name, "method": arm.series, "base_method": arm.method, "group": arm.group,
        "params": dict(arm.params), "geometry": arm.geometry, "base_seed": arm.base_seed, "seed": arm.seed,
        "resolved": resolved, "taught_order": _taught_order(run_dir),
    }  # fmt: skip
    if selection:
        common["selection"] = selection
        common["rows_per_step"] = selection["rows_per_step"]
    return [
        {**common, "step": step, "metrics": metrics, "items": items.get(step, {})}
        for step, metrics in sorted(by_step.items())
    ]


def base_records(key: BaseKey, eval_json: Path, items_jsonl: Path) -> list[dict[str, Any]]:
    """The base evaluation (tools/evaluate.py's results JSON + its items) as the base's step-0 record."""
    doc = json.loads(eval_json.read_text())
    metrics = {metric_key(m["task"], m["metric"]): float(m["value"]) for m in doc["results"]}
    items = read_items(items_jsonl)
    return [{
        "arm": "base", "method": "base", "group": "base", "params": {}, "geometry": key.geometry,
        "base_seed": key.seed, "seed": None, "step": 0, "metrics": metrics, "items": items.get(0, {}),
    }]  # fmt: skip


def healed_records(layout: Layout, key: BaseKey) -> list[dict]:
    """A retrofit's healed model beside an `hf` reference, as a base-like record (arm "healed")."""
    committed = layout.base_result(key, "healed")
    if committed is not None and committed.is_file():
        return json.loads(committed.read_text())["records"]
    if layout.healed_eval(key).is_file() and layout.healed_items(key).is_file():
        recs = base_records(key, layout.healed_eval(key), layout.healed_items(key))
        return [{**r, "arm": "healed", "method": "healed"} for r in recs]
    return []


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
