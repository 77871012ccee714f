"""Optimizers with parameter groups: decayed matrices, undecayed vectors, memory value rows on their own."""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_mem.models.memory import MemoryValues


def memory_value_params(model: nn.Module) -> list[nn.Parameter]:
    """Every memory value table (shared pools counted once)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, MemoryValues):
            seen[id(mod.weight)] = mod.weight
    return list(seen.values())


def param_groups(model: nn.Module, cfg, params: list[nn.Parameter] | None = None) -> list[dict]:
    """Split trainable params into groups; `params` restricts them (finetune modes train a subset)."""
    allowed = None if params is None else {id(p) for p in params}
    value_ids = {id(p) for p in memory_value_params(model)}
    decay, no_decay, values = [], [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen or (allowed is not None and id(p) not in allowed):
            continue
        seen.add(id(p))
        if id(p) in value_ids:
            values.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
        {
            "params": values,
            "weight_decay": cfg.memory_weight_decay,
            "lr": cfg.lr if cfg.memory_lr is None else cfg.memory_lr,
            "name": "memory_values",
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg, params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, params)
    if not groups:
        raise ValueError("optimizer: no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
