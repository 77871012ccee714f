"""Evaluation inside a training run (`[eval]`): the Trainer's model, as it is, on a fixed set of tasks every
`eval.every` steps, logged as `eval/<task>/<metric>` to metrics.jsonl (and TensorBoard), and every item's
scores as one line of `<dump_folder>/eval_items.jsonl` (rank 0 writes; format: eval/items.py). The study
reads learning and forgetting along the finetuning stream from these records, with intervals over items.

Evaluation does not touch training state: greedy decoding draws no random numbers, modules go back to
their own train/eval flags (`runner.eval_mode`), and gradients are off, so a run with evaluation takes the
same steps as one without. The items come from the pass that makes the metrics (no extra forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titan_mem.config import Config
from titan_mem.errors import ConfigError
from titan_mem.eval.items import ITEMS_FILE, append_items
from titan_mem.eval.lm import EvalModel
from titan_mem.eval.runner import run_tasks
from titan_mem.eval.tasks import TaskContext, TaskError, build_tasks


class InLoopEvaluator:
    """Tasks built (data loaded) once at start; `run(step)` scores the live model."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: Any, max_seq_len: int) -> None:
        ev = cfg.eval
        self.every, self.at_start, self.at_steps = ev.every, ev.at_start, set(ev.at_steps)
        data_dir = Path(ev.data_dir) if ev.data_dir else None
        ctx = TaskContext(data_dir, cfg.data, ev.limit or None, ev.shots, ev.shots_seed)
        try:
            self.tasks = build_tasks(ev.tasks, ctx)
        except TaskError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
        self.lm = EvalModel(model, tokenizer, max_seq_len=max_seq_len, batch_size=ev.batch_size)
        self.items_path = Path(cfg.job.dump_folder) / ITEMS_FILE

    def due(self, step: int, last: bool) -> bool:
        """After optimizer step `step`: at each of `eval.at_steps`, and every `eval.every` steps and at the
        last one (if `every` > 0)."""
        return step in self.at_steps or (self.every > 0 and (step % self.every == 0 or last))

    def run(self, step: int) -> dict[str, float]:
        """The metrics to log at `step`; rank 0 also appends the step's items to eval_items.jsonl."""
        with torch.no_grad():
            out = run_tasks(self.lm, self.tasks)
        if self.lm.rank == 0:
            append_items(self.items_path, step, out.predictions)
        return {f"eval/{m['task']}/{m['metric']}": m["value"] for m in out.metrics}


def build_in_loop_evaluator(
    cfg: Config, model: torch.nn.Module, tokenizer: Any, max_seq_len: int
) -> InLoopEvaluator | None:
    return InLoopEvaluator(cfg, model, tokenizer, max_seq_len) if cfg.eval.tasks else None
