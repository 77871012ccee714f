"""LoRA finetuning (Hu et al. 2021; the SMF papers' second baseline): adapters on the named projections
are the only parameters that train; query batch-norm statistics stay frozen."""

from __future__ import annotations

import torch.nn as nn

from titan_mem.config import Config
from titan_mem.models.lora import add_lora, lora_parameter_names
from titan_mem.modes.base import TrainingMode, freeze_batchnorm


class LoRAConverter:
    """Adds LoRA adapters to the named projections of the meta-device model."""

    def __init__(self, targets: list[str], rank: int, alpha: float):
        self.targets, self.rank, self.alpha = targets, rank, alpha
        self._names: set[str] = set()

    def convert(self, model: nn.Module) -> None:
        add_lora(model, self.targets, self.rank, self.alpha)
        self._names = set(lora_parameter_names(model))

    def new_tensor_names(self) -> set[str]:
        return set(self._names)


class LoRAFinetune(TrainingMode):
    name = "lora_finetune"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        ft = cfg.finetune
        self.converters = [LoRAConverter(ft.lora_targets, ft.lora_rank, ft.lora_alpha)]

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        keep = self.new_tensor_names()
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        freeze_batchnorm(model)
        return [p for p in model.parameters() if p.requires_grad]
