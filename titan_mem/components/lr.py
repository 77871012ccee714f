"""Learning-rate schedules as multipliers of the peak lr: warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math

import torch


def lr_multiplier(
    step: int, total: int, warmup: int, decay_type: str, decay_ratio: float, min_factor: float
) -> float:
    """Multiplier for the lr used at optimizer step `step` (0-based).

    cosine: linear warmup, then min + (1-min) * (1 + cos(pi * progress)) / 2 (Loshchilov & Hutter 2017).
    wsd: warmup, constant, then linear decay over the last `decay_ratio` of steps (Hu et al. 2024, MiniCPM).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay_type == "constant":
        return 1.0
    if decay_type == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(total * decay_ratio)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_factor) * progress


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s, total_steps, cfg.warmup_steps, cfg.decay_type, cfg.decay_ratio, cfg.min_lr_factor
        ),
    )
