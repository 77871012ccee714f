"""LoRA adapters (Hu et al. 2021, "LoRA", eq. 3): h = W x + (alpha / r) * B A x, with B = 0 at init so the
adapted model starts equal to the base. The base weight stays the `weight` of the same nn.Linear, so state
dict names of the base model do not change and a pretraining checkpoint loads as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_mem.errors import ConfigError


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; `lora_a` [r, in], `lora_b` [out, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))

    def init_lora(self) -> None:
        # A ~ Kaiming-uniform, B = 0 (Hu et al. sec. 4.1): the product starts at zero.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


LORA_TARGET_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "gate_proj", "value_proj", "query_proj")


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear (meta device is fine).

    Returns the qualified names of the replaced modules. Must run before the weights are materialised.
    """
    unknown = [t for t in targets if t not in LORA_TARGET_NAMES]
    if unknown:
        raise ConfigError(f"finetune.lora_targets: unknown {unknown} (known: {', '.join(LORA_TARGET_NAMES)})")
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                with torch.device(child.weight.device):
                    lora = LoRALinear(
                        child.in_features, child.out_features, rank, alpha, bias=child.bias is not None
                    )
                setattr(parent, child_name, lora)
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not replaced:
        raise ConfigError(f"finetune.lora_targets: {targets} matched no linear layer of the model")
    return replaced


def lora_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], alpha_over_rank: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Fold each adapter into its base weight (W + scale * B A) and drop the adapter tensors.

    `alpha_over_rank[prefix]` is the scale of module `prefix`; the result is a plain base-model state dict.
    """
    out = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for prefix, scale in alpha_over_rank.items():
        a, b = state[f"{prefix}.lora_a"], state[f"{prefix}.lora_b"]
        w = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out
