"""The parts a training mode is made of, and their pretraining defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_mem.data.packing import IGNORE_INDEX
from titan_mem.models.lora import add_lora, lora_parameter_names
from titan_mem.parallel.value_grads import ValueTableGrad


class ModelConverter(Protocol):
    """Changes the meta-device model before sharding; names the new tensors a base checkpoint lacks."""

    def convert(self, model: nn.Module) -> None: ...

    def new_tensor_names(self) -> set[str]: ...


class LoRAConverter:
    """Adds LoRA adapters (Hu et al. 2021) to the named projections."""

    def __init__(self, targets: list[str], rank: int, alpha: float):
        self.targets, self.rank, self.alpha = targets, rank, alpha
        self._names: set[str] = set()

    def convert(self, model: nn.Module) -> None:
        add_lora(model, self.targets, self.rank, self.alpha)
        self._names = set(lora_parameter_names(model))

    def new_tensor_names(self) -> set[str]:
        return set(self._names)


def freeze_batchnorm(model: nn.Module) -> None:
    """Frozen statistics: a finetune that trains a subset must not move running means either."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.eval()


class TrainablePolicy:
    """Every parameter trains (pretraining, full finetuning)."""

    def fsdp_ignored(self, model: nn.Module) -> set[str]:
        """Parameter names FSDP must leave whole on every rank."""
        return set()

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        """Freeze what does not train (weights are loaded); return the trainable parameters."""
        return [p for p in model.parameters() if p.requires_grad]


class LazyValueRows(TrainablePolicy):
    """Every parameter trains; memory value tables get a row-sparse gradient (only the rows read) for the
    lazy row AdamW (optimizer.memory_update=lazy, components/lazy_adamw.py)."""

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        for layer in model.memory_layers().values():
            layer.sparse_grad = True
        return super().apply(model)


class OnlyNamed(TrainablePolicy):
    """Only the named parameters train (LoRA adapters); query batch-norm statistics frozen."""

    def __init__(self, names: Callable[[], set[str]]):
        self.names = names

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        keep = self.names()
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        freeze_batchnorm(model)
        return [p for p in model.parameters() if p.requires_grad]


class StepHook:
    """Called by the Trainer at three points of a step; the defaults do nothing."""

    reads_slots = False  # True: the Trainer's forward returns the memory slots each token read

    def on_micro_batch(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]
    ) -> None:
        """After each micro-batch's backward; `slots`: {memory layer name: slots [B, T, heads, topk]} of
        its forward when `reads_slots`, else empty."""

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        """After the last backward, before clipping; returns values to log."""
        return {}

    def after_step(self, step: int) -> dict[str, Any]:
        """After the optimizer step of `step`; returns values to log."""
        return {}


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
            path.table.grad = path.table.grad.coalesce()

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        read = total = 0
        for path in self._sparse_tables():
            table = path.table
            table.grad = path.sum_rows_read(table.grad)
            read, total = read + table.grad._nnz(), total + table.shape[0]
        return {"value_rows_read": read / total} if total else {}


class Objective(Protocol):
    """What a step minimises. The loss of a global batch is a sum over units (loss tokens, sequences) divided
    by their count over every rank and micro-batch, so it and its gradient do not depend on how the batch is
    split (DESIGN invariant 2)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The units this micro-batch contributes to the global count."""
        ...

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], total: int, return_slots: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this micro-batch's share of the loss, to backward; the memory slots read when `return_slots`)."""
        ...


class NextTokenLoss:
    """Cross-entropy of each loss token's next-token prediction, summed and divided by the global batch's
    loss-token count (the Trainer's objective for every mode but a distillation heal)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], total: int, return_slots: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slots: dict[str, torch.Tensor] = {}
        if return_slots:
            logits, slots = model(batch["input_ids"], return_slots=True)
        else:
            logits = model(batch["input_ids"])
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss / total, slots


@dataclass
class TrainingMode:
    name: str
    policy: TrainablePolicy
    # (model, trainable parameters, value-table gradient paths) -> optimizer
    build_optimizer: Callable[[nn.Module, list[nn.Parameter], dict], torch.optim.Optimizer]
    build_checkpoint: Callable[..., Any]
    converters: list[ModelConverter] = field(default_factory=list)
    # (model, optimizer, device, value-table gradient paths) -> step hooks
    build_hooks: Callable[..., list[StepHook]] = lambda model, optimizer, device, value_grads: []
    # (model, device) -> what a step minimises
    build_objective: Callable[[nn.Module, torch.device], Objective] = lambda model, device: NextTokenLoss()

    def new_tensor_names(self) -> set[str]:
        """Tensors a checkpoint from pretraining lacks (fresh adapters)."""
        out: set[str] = set()
        for c in self.converters:
            out |= c.new_tensor_names()
        return out
