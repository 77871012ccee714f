"""Optimizers with parameter groups: decayed matrices, undecayed vectors, memory value rows on their own."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from titan_mem.components.lazy_adamw import LazyRowAdamW
from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.update import value_row_lr


def param_groups(model: nn.Module, cfg, params: list[nn.Parameter] | None = None) -> list[dict]:
    """Split trainable params into groups; `params` restricts them (finetune modes train a subset)."""
    allowed = None if params is None else {id(p) for p in params}
    value_ids = {id(p) for p in model.value_tables().values()}  # shared pools once
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
            "lr": value_row_lr(cfg),
            "name": "memory_values",
        },
    ]
    return [g for g in groups if g["params"]]


def adamw_kernels(implementation: str, device: torch.device) -> dict[str, bool]:
    """torch.optim.AdamW's fused/foreach switches: fused on CUDA (one kernel launch for every tensor of a
    group instead of several per tensor), foreach on CPU (where fused gains little)."""
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def build_optimizer(model: nn.Module, cfg, params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, params)
    if not groups:
        raise ValueError("optimizer: no trainable parameters")
    if cfg.name == "adamw" and cfg.memory_update == "lazy":
        lazy = [p for g in groups if g["name"] == "memory_values" for p in g["params"]]
        return LazyRowAdamW(groups, lazy, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        kernels = adamw_kernels(cfg.implementation, groups[0]["params"][0].device)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, value_grads: Iterable[ValueTableGrad] = ()
) -> torch.Tensor:
    """Global gradient L2 norm over every parameter: dense and FSDP (DTensor) gradients by torch, each value
    table outside FSDP by its gradient path (`parallel.value_grads`: row-sparse, column-sharded). Scales
    every gradient by min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Clipping only."""
    paths = {id(v.table): v for v in value_grads}
    with_grad = [p for p in params if p.grad is not None]
    dense = [p for p in with_grad if id(p) not in paths]
    tables = [paths[id(p)] for p in with_grad if id(p) in paths]
    if any(p.grad.is_sparse for p in dense):
        raise RuntimeError("clip_grad_norm_: a row-sparse gradient outside the value tables' paths")
    parts = []
    if dense:
        norm = torch.nn.utils.get_total_norm([p.grad for p in dense], norm_type=2.0)
        parts.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    parts += [t.squared_norm().sqrt() for t in tables]
    if not parts:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([p.double().cpu() for p in parts]))
    if max_norm > 0:
        if dense:
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total.float())
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for t in tables:
                t.scale(coef)
    return total.float()
