"""Pretraining: every parameter trains with the dense optimizer. With `optimizer.memory_update = "lazy"`
the value tables get a row-sparse gradient (only the rows a step read) and the lazy row AdamW steps them
(components/lazy_adamw.py); the rows read are summed over memory-parallel replicas once per step."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from titan_mem.kernels import coalesced
from titan_mem.modes.base import StepHook, TrainingMode
from titan_mem.parallel.value_grads import ValueTableGrad


class SumRowsReadOverReplicas(StepHook):
    """Lazy value rows: sum each table's row-sparse gradient (the rows read) by its gradient path once per
    step, before clipping (`parallel.value_grads`: over memory-parallel replica groups); logs the fraction
    of value rows the step read (`value_rows_read`), which is how far lazy AdamW is from dense AdamW."""

    def __init__(self, value_grads: dict[str, ValueTableGrad]):
        self.value_grads = value_grads

    def _sparse_tables(self) -> list[ValueTableGrad]:
        """Value tables holding a row-sparse gradient, each once (a shared pool is one table)."""
        return [v for v in self.value_grads.values() if v.table.grad is not None and v.table.grad.is_sparse]

    def on_micro_batch(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]
    ) -> None:
        """Coalesce after each backward: accumulated sparse gradients only concatenate, which would hold a
        copy of the rows read per micro-batch; coalesced, they never exceed the table's own size."""
        for path in self._sparse_tables():
            path.table.grad = coalesced(path.table.grad)

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        read = total = 0
        for path in self._sparse_tables():
            table = path.table
            table.grad = path.sum_rows_read(table.grad)
            read, total = read + table.grad._nnz(), total + table.shape[0]
        return {"value_rows_read": read / total} if total else {}


class Pretrain(TrainingMode):
    name = "pretrain"

    @property
    def lazy_values(self) -> bool:
        return self.cfg.optimizer.memory_update == "lazy"

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        if self.lazy_values:
            model.set_sparse_value_grad(True)
        return super().prepare(model)

    def build_hooks(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        value_grads: dict[str, ValueTableGrad],
    ) -> list[StepHook]:
        return [SumRowsReadOverReplicas(value_grads)] if self.lazy_values else []
