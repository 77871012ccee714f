"""What every evaluation task shares: the context it reads, the output it returns, its error, and the
per-task options a task spec may carry (`TASK[:SOURCE]@shots=0@limit=100@label=taught`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_mem.data.config import DataConfig
from titan_mem.errors import UserError


class TaskError(UserError, ValueError):
    """A task that cannot run: unknown name, missing data file, malformed record (one line, names it)."""


@dataclass
class TaskOutput:
    """Metric records ({task, metric, value, n}) and per-example predictions of one task."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per task (runner fills it)

    def add(self, task: str, metric: str, value: float, n: int) -> None:
        self.metrics.append({"task": task, "metric": metric, "value": float(value), "n": int(n)})


@dataclass
class TaskContext:
    """What tasks may read besides the model: the local data folder, the run's data config (synthetic
    world, taught split), the example limit, and the few-shot exemplars' count and seed (eval/fewshot.py)."""

    data_dir: Path | None = None
    data: DataConfig | None = None
    limit: int | None = None
    shots: int = 0
    shots_seed: int = 0
    generate: bool = True  # QA tasks: greedy answers (EM, F1) besides the answer NLL


TASK_OPTIONS = ("shots", "limit", "label", "generate")


def task_options(spec: str, ctx: TaskContext) -> tuple[str, TaskContext, str]:
    """`TASK[@shots=0][@limit=100][@label=taught][@generate=0]` (`@`, not `,`: task lists are comma-joined):
    this task's own shots and limit (e.g. a 0-shot GSM8K NLL beside 5-shot QA; a fact file of exactly 100
    items, then its exemplar pool), `label`, which names it `task/label` (two files of one task in one
    run), and `generate=0`: QA answer NLL only, no greedy answers (NLL-first evaluation)."""
    spec, *parts = spec.split("@")
    opts: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in TASK_OPTIONS or not value or (key != "label" and not value.isdigit()):
            raise TaskError(f"{spec}: @{part} is not one of @{', @'.join(TASK_OPTIONS)}=VALUE")
        opts[key] = value
    shots, limit = int(opts.get("shots", ctx.shots)), int(opts.get("limit", ctx.limit or 0)) or None
    generate = opts.get("generate", "1") != "0"
    return spec, dataclasses.replace(ctx, shots=shots, limit=limit, generate=generate), opts.get("label", "")
