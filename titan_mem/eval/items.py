"""Per-item evaluation records: every score of every item at an evaluation point, so the study can
bootstrap confidence intervals over items (and regroup them, e.g. known facts by `person_kind`).

One JSON line per evaluation point, `{"step": S, "tasks": {TASK: {"id": [...], "group": [...], METRIC:
[...], ...}}}`: columns of equal length, one entry per item in the task's order. QA and completion tasks
keep `em`, `f1`, `answer_nll` (nats per answer token) and `tokens` (answer tokens); perplexity tasks `nll`
(nats per token), `tokens` and `bytes` per document; other tasks their own per-item scores. `group` (the
person id of a synthetic fact) is there only for tasks whose items have one. The logged aggregates follow
from the columns: em / f1 / acc are plain means, answer_nll / nll token-weighted means (`nll_summary`).

The trainer appends a line per evaluation point to `<dump_folder>/eval_items.jsonl` (a resumed run may
log a step again: a reader keeps the last line of each step, `read_items`); `evaluate_checkpoint`'s
`items_out` writes one line, step 0, whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from titan_mem.checkpoint.files import atomic_file

ITEMS_FILE = "eval_items.jsonl"
# prediction fields that are not per-item scores (text, references; `group` is its own column)
_NOT_SCORES = {"task", "id", "group", "prompt", "prediction", "references"}


def items_of(predictions: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """`TaskOutput.predictions` as columns per task: id, group (when the items have one), and every scalar
    score of the task's records."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for p in predictions:
        by_task.setdefault(p["task"], []).append(p)
    out: dict[str, dict[str, list[Any]]] = {}
    for task, records in by_task.items():
        columns: dict[str, list[Any]] = {"id": [r["id"] for r in records]}
        if any("group" in r for r in records):
            columns["group"] = [r.get("group") for r in records]
        for key, value in records[0].items():
            if key not in _NOT_SCORES and isinstance(value, (int, float)) and not isinstance(value, bool):
                columns[key] = [r.get(key) for r in records]
        out[task] = columns
    return out


def items_line(step: int, predictions: Sequence[dict[str, Any]]) -> str:
    """One evaluation point's line (with its newline)."""
    return json.dumps({"step": int(step), "tasks": items_of(predictions)}, ensure_ascii=False) + "\n"


def append_items(path: Path, step: int, predictions: Sequence[dict[str, Any]]) -> None:
    """Append one line in a single write (a crash leaves at most a torn last line, which `read_items`
    skips)."""
    line = items_line(step, predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def write_items(path: Path, step: int, predictions: Sequence[dict[str, Any]]) -> None:
    """A file of one line, whole or not at all (`atomic_file`: temp file, fsync, rename)."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(items_line(step, predictions), encoding="utf-8")


def read_items(path: Path) -> dict[int, dict[str, dict[str, list[Any]]]]:
    """{step: tasks} of an items file, the last line of each step winning; a torn line is skipped."""
    out: dict[int, dict[str, dict[str, list[Any]]]] = {}
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        out[int(record["step"])] = record["tasks"]
    return out
