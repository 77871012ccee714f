"""Training modes. A mode may change only which parameters train, the optimizer and the update rule;
the data path, loop and checkpoint format are shared (DESIGN.md, "one Trainer")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from titan_mem.checkpoint import OptimizerState
from titan_mem.components.optim import build_optimizer
from titan_mem.config import Config, ConfigError
from titan_mem.models.lora import add_lora, lora_parameter_names


class TrainMode:
    """Pretraining: every parameter trains with the configured optimizer. Hooks are no-ops."""

    name = "pretrain"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.current_step = 0  # the optimizer step being computed (set by the Trainer)

    def prepare_model(self, model: nn.Module) -> None:
        """Change the meta-device model before sharding (e.g. add adapters)."""

    def missing_ok_on_initial_load(self) -> set[str]:
        """Model tensors a checkpoint from pretraining may lack (e.g. fresh adapters)."""
        return set()

    def after_load(self, model: nn.Module) -> None:
        """Freeze what this mode does not train, once weights are in place."""

    def fsdp_ignored_param_names(self, model: nn.Module) -> set[str]:
        """Names of parameters FSDP must leave alone (kept whole on every rank)."""
        return set()

    def trainable_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg.optimizer, self.trainable_params(model))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        return OptimizerState(model, optimizer)

    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient L2 norm (DTensor-aware), clipping in place when max_norm > 0."""
        params = [p for p in self.trainable_params(model) if p.grad is not None]
        if not params:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def step_info(self) -> dict[str, Any]:
        """Values to log after the optimizer step."""
        return {}

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


class FinetuneMode(TrainMode):
    """Any finetuning mode: it starts from a pretrained checkpoint, never from random weights."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if not cfg.checkpoint.initial_load_path:
            raise ConfigError(
                f"checkpoint.initial_load_path: {self.name} needs the pretrained checkpoint to start from"
            )


class FullFinetuneMode(FinetuneMode):
    """The full-finetuning baseline: every parameter, starting from a pretrained checkpoint."""

    name = "full_finetune"


class LoRAFinetuneMode(FinetuneMode):
    """The LoRA baseline: adapters on the chosen projections, base weights frozen (and left untouched)."""

    name = "lora_finetune"

    def prepare_model(self, model: nn.Module) -> None:
        ft = self.cfg.finetune
        add_lora(model, ft.lora_targets, ft.lora_rank, ft.lora_alpha)
        self.lora_names = lora_parameter_names(model)

    def missing_ok_on_initial_load(self) -> set[str]:
        return set(self.lora_names)

    def after_load(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(name in self.lora_names)
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.eval()


def build_mode(cfg: Config) -> TrainMode:
    modes = {
        "pretrain": TrainMode,
        "full_finetune": FullFinetuneMode,
        "lora_finetune": LoRAFinetuneMode,
    }
    if cfg.training.mode == "sparse_finetune":
        from titan_mem.sparse.mode import SparseFinetuneMode  # imported late: it imports this module

        return SparseFinetuneMode(cfg)
    return modes[cfg.training.mode](cfg)
