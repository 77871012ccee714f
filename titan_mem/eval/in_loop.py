"""Evaluation inside a training run (`[eval]`): the Trainer's model, as it is, on a fixed set of tasks every
`eval.every` steps, logged as `eval/<task>/<metric>` to metrics.jsonl (and TensorBoard). The study reads
learning and forgetting along the finetuning stream from these records.

Evaluation does not touch training state: greedy decoding draws no random numbers, modules go back to
their own train/eval flags (`runner.eval_mode`), and gradients are off, so a run with evaluation takes the
same steps as one without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titan_mem.config import Config, ConfigError
from titan_mem.eval.lm import EvalModel
from titan_mem.eval.runner import run_tasks
from titan_mem.eval.tasks import TaskContext, TaskError, build_tasks


class InLoopEvaluator:
    """Tasks built (data loaded) once at start; `run(step)` scores the live model."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: Any, max_seq_len: int) -> None:
        ev = cfg.eval
        self.every, self.at_start = ev.every, ev.at_start
        ctx = TaskContext(Path(ev.data_dir) if ev.data_dir else None, cfg.data, ev.limit or None, 0)
        try:
            self.tasks = build_tasks(ev.tasks, ctx)
        except TaskError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
        self.lm = EvalModel(model, tokenizer, max_seq_len=max_seq_len, batch_size=ev.batch_size)

    def due(self, step: int, last: bool) -> bool:
        """After optimizer step `step`: every `eval.every` steps and at the last one (if `every` > 0)."""
        return self.every > 0 and (step % self.every == 0 or last)

    def run(self) -> dict[str, float]:
        with torch.no_grad():
            metrics = run_tasks(self.lm, self.tasks).metrics
        return {f"eval/{m['task']}/{m['metric']}": m["value"] for m in metrics}


def build_in_loop_evaluator(
    cfg: Config, model: torch.nn.Module, tokenizer: Any, max_seq_len: int
) -> InLoopEvaluator | None:
    return InLoopEvaluator(cfg, model, tokenizer, max_seq_len) if cfg.eval.tasks else None
