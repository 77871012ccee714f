"""What every training mode decides, and what pretraining decides for each (the defaults).

The Trainer (train.py) calls a mode through this interface only, in this order, and never asks which mode
it is (docs/design.md, "One Trainer, no mode branches"):

    converters                  change the meta-device model before sharding (LoRA adds adapters)
    fsdp_ignored(model)         parameters FSDP must leave whole on every rank (sparse: the value tables)
    prepare(model)              freeze what does not train, switch on the gradients it needs; trainable list
    build_optimizer(...)        the optimizer over the trainable parameters
    build_checkpoint(...)       what a checkpoint holds: the whole model, or a knowledge patch on the base
    build_hooks(...)            step hooks (`before_backward`, `on_micro_batch`, `prepare_gradients`,
                                `after_step`)
    build_objective(...)        what a step minimises (next-token loss, or a heal's distillation)

A mode is one module in this package; `check(cfg)` refuses what it cannot run before anything is built
(preflight calls it too).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_mem.checkpoint.content import FullContent
from titan_mem.components.optim import build_optimizer
from titan_mem.config import Config
from titan_mem.data.packing import IGNORE_INDEX
from titan_mem.parallel.value_grads import ValueTableGrad


class ModelConverter(Protocol):
    """Changes the meta-device model before sharding; names the new tensors a base checkpoint lacks."""

    def convert(self, model: nn.Module) -> None: ...

    def new_tensor_names(self) -> set[str]: ...


class StepHook:
    """Called by the Trainer at three points of a step; the defaults do nothing."""

    reads_slots = False  # True: the Trainer's forward returns the memory slots each token read

    def before_backward(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor], final: bool
    ) -> None:
        """After each micro-batch's forward, before its backward (`final`: the step's last micro-batch);
        `slots`: {memory layer name: slots [B, T, heads, topk]} of the forward when `reads_slots`, else
        empty."""

    def on_micro_batch(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]
    ) -> None:
        """After each micro-batch's backward; `slots` as for `before_backward`."""

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        """After the last backward, before clipping; returns values to log."""
        return {}

    def after_step(self, step: int) -> dict[str, Any]:
        """After the optimizer step of `step`; returns values to log."""
        return {}


class Objective(Protocol):
    """What a step minimises. The loss of a global batch is a sum over units (loss tokens, sequences) divided
    by their count over every rank and micro-batch, so it and its gradient do not depend on how the batch is
    split (docs/design.md, invariant 2)."""

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
    loss-token count (the objective of every mode but a distillation heal)."""

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


def freeze_batchnorm(model: nn.Module) -> None:
    """Frozen statistics: a finetune that trains a subset must not move running means either."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.eval()


class TrainingMode:
    """Pretraining's answers to every question the Trainer asks; a mode overrides what it changes."""

    name: ClassVar[str]

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.converters: list[ModelConverter] = []

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse a config this mode cannot run (one ConfigError line naming the key)."""

    def fsdp_ignored(self, model: nn.Module) -> set[str]:
        """Parameter names FSDP must leave whole on every rank."""
        return set()

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        """Freeze what does not train (weights are loaded); return the trainable parameters."""
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(
        self, model: nn.Module, params: list[nn.Parameter], value_grads: dict[str, ValueTableGrad]
    ) -> torch.optim.Optimizer:
        """`value_grads`: how each value table's gradient is summed, clipped and stepped (parallel/)."""
        return build_optimizer(model, self.cfg.optimizer, params)

    def build_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        return FullContent(model, optimizer)

    def build_hooks(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        value_grads: dict[str, ValueTableGrad],
    ) -> list[StepHook]:
        return []

    def build_objective(self, model: nn.Module, device: torch.device) -> Objective:
        return NextTokenLoss()

    def new_tensor_names(self) -> set[str]:
        """Tensors a checkpoint from pretraining lacks (fresh adapters)."""
        out: set[str] = set()
        for c in self.converters:
            out |= c.new_tensor_names()
        return out
