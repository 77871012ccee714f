"""Training modes. A mode may change only which parameters train, the optimizer and the update rule;
the data path, loop and checkpoint format are shared (DESIGN.md, "one Trainer")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from titan_mem.components.optim import build_optimizer
from titan_mem.config import Config, ConfigError


class TrainMode:
    """Pretraining: every parameter trains with the configured optimizer. Hooks are no-ops."""

    name = "pretrain"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare_model(self, model: nn.Module) -> None:
        """Change the meta-device model before sharding (e.g. add adapters)."""

    def missing_ok_on_initial_load(self) -> set[str]:
        """Model tensors a checkpoint from pretraining may lack (e.g. fresh adapters)."""
        return set()

    def after_load(self, model: nn.Module) -> None:
        """Freeze what this mode does not train, once weights are in place."""

    def trainable_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg.optimizer, self.trainable_params(model))

    def extra_states(self) -> dict[str, Any]:
        return {}

    def before_forward(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        pass

    def after_micro_batch(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        pass

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass


class FullFinetuneMode(TrainMode):
    """The full-finetuning baseline: every parameter, starting from a pretrained checkpoint."""

    name = "full_finetune"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if not cfg.checkpoint.initial_load_path:
            raise ConfigError("checkpoint.initial_load_path: full_finetune needs the pretrained checkpoint to start from")


def build_mode(cfg: Config, model: nn.Module) -> TrainMode:
    modes = {"pretrain": TrainMode, "full_finetune": FullFinetuneMode}
    if cfg.training.mode not in modes:
        raise ConfigError(f"training.mode: {cfg.training.mode!r} is not available yet")
    return modes[cfg.training.mode](cfg)
