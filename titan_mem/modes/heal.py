"""Healing a retrofit (Goyal et al. 2026, sec. 3.3 stage 2): every memory-layer parameter trains (queries,
keys, values, Memory+ projections, an `add` retrofit's output gate), every other one stays as loaded. The
objective is the next-token loss, or (`retrofit.heal_objective = "distill"`) each memory layer learning
the FFN it replaced (hf/distill.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_mem.config import Config
from titan_mem.errors import ConfigError
from titan_mem.hf.distill import FFNDistillation
from titan_mem.hf.retrofit import resolve_base
from titan_mem.modes.base import NextTokenLoss, Objective, TrainingMode


class Heal(TrainingMode):
    name = "heal"

    @classmethod
    def check(cls, cfg: Config) -> None:
        """A distillation heal's memory-layer hooks fire once per forward, so neither a recomputing backward
        (activation checkpointing) nor a compiled block (untested) takes part."""
        if cfg.retrofit.heal_objective != "distill":
            return
        if cfg.training.activation_checkpoint != "none":
            raise ConfigError(
                "training.activation_checkpoint: retrofit.heal_objective=distill keeps only the memory "
                "layers' "
                f"activations and needs none; got {cfg.training.activation_checkpoint}"
            )
        if cfg.training.compile:
            raise ConfigError("training.compile: not supported with retrofit.heal_objective=distill")

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        layers = model.memory_layers()
        if not layers:
            raise ConfigError("training.mode=heal: the model has no memory layer (retrofit.layers)")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            for p in layer.parameters():
                p.requires_grad_(True)
        for table in model.value_tables().values():  # a shared pool belongs to the Transformer, not a layer
            table.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    def build_objective(self, model: nn.Module, device: torch.device) -> Objective:
        if self.cfg.retrofit.heal_objective == "distill":
            return FFNDistillation.from_retrofit(model, resolve_base(self.cfg.retrofit.base), device)
        return NextTokenLoss()
