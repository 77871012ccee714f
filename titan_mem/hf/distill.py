"""Layer-local distillation heal of a `replace` retrofit (`retrofit.heal_objective = "distill"`).

Goyal et al. 2026 (sec. 3.3, stage 2) heal a retrofit on the LM loss over instruction data; on a real model
300 such steps did not restore what `replace` removed (docs/results.md, "Retrofit": in-context copying).
This objective asks each memory layer for exactly what was removed: to output what its block's FFN output,
on the same normalised input. The teacher is the base's FFN at that block (read from `retrofit.base`, frozen,
held here: never in the model's parameters, optimizer or checkpoint). The blocks before the first memory
layer are the base's, and the residual stream continues with the *teacher's* output at every memory block,
so each memory layer sees exactly the base's input, also behind another memory layer; no gradient crosses a
block (`Transformer.layer_outputs` detaches between blocks), so each layer learns alone, and nothing after
the last memory block (later blocks, the output layer) is computed.

Loss of layer l on sequence s (positions of real tokens, `token_mask`): the fraction of the FFN output's
energy the memory leaves unexplained, E_ls = sum |m - f|^2 / sum |f|^2 (0: the FFN reproduced, 1: an output
of 0). The step's loss is the mean of E_ls over the global batch's sequences and the memory layers. A ratio
per sequence, not over the whole batch: a sum over sequences divided by their global count is the same
whatever the ranks and micro-batches (DESIGN invariant 2), where a whole-batch denominator would need a
second pass before any backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_mem.hf.retrofit import replaced_ffns
from titan_mem.models.transformer import FeedForward


class _LocalLoss(torch.autograd.Function):
    """A loss term computed off the graph: forward returns `value`; backward hands `grad` (d value / d anchor,
    computed with it) to `anchor`, the block output FSDP's backward hooks sit on."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * upstream.to(grad.dtype)), None, None


class FFNDistillation:
    """The heal objective (`modes.base.Objective`) that distils each dropped FFN into its memory layer.

    Only the memory layers may train (training.mode=heal's policy): a loss term's gradient enters at its
    block's output, so a trainable attention in that block would receive it too."""

    def __init__(self, teachers: dict[int, nn.Module]):
        if not teachers:
            raise ValueError("distillation needs at least one teacher FFN")
        self.teachers = teachers  # block index -> the base's FFN at that block (frozen)
        self.n_blocks = max(teachers) + 1  # blocks to run: up to the last memory layer
        self._mask: torch.Tensor | None = None
        self._scale = 1.0
        self._terms: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_retrofit(cls, model: nn.Module, folder: Path, device: torch.device) -> FFNDistillation:
        """Teachers for `model` (a `replace` retrofit of the HF model in `folder`), on `device` in fp32."""
        args = model.args
        teachers: dict[int, nn.Module] = {}
        for block, weights in replaced_ffns(folder, args).items():
            ffn = FeedForward(args.dim, args.ffn_hidden_dim)
            ffn.load_state_dict(weights)
            teachers[block] = ffn.to(device).requires_grad_(False).eval()
        return cls(teachers)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Sequences holding at least one real token."""
        return int(batch["token_mask"].any(1).sum())

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], total: int, return_slots: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the loss; its gradient reaches only the memory layers."""
        self._mask = batch["token_mask"]
        self._scale = 1.0 / (total * len(self.teachers))
        self._terms = []
        layers = {i: model.layers[str(i)].feed_forward for i in self.teachers}
        handles = [layer.register_forward_hook(self._hook(i)) for i, layer in layers.items()]
        try:
            outs = model.layer_outputs(batch["input_ids"], self.n_blocks)
        finally:
            for h in handles:
                h.remove()
        if sorted(i for i, _, _ in self._terms) != sorted(self.teachers):
            raise RuntimeError("distillation: a memory layer did not run exactly once")
        loss = sum(_LocalLoss.apply(outs[i], value, grad) for i, value, grad in self._terms)
        self._terms, self._mask = [], None
        return loss, {}

    def _hook(self, block: int):
        teacher = self.teachers[block]

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            """Record this layer's loss term and its gradient; the block goes on with the teacher's output."""
            (x,) = inputs  # the block's normalised input, [B, T, dim]
            with torch.no_grad():
                target = teacher(x.float())
                mask = self._mask.to(target.dtype)[..., None]
                diff = (out.detach().float() - target) * mask
                energy = (target.square() * mask).sum((1, 2))
                weight = torch.where(energy > 0, self._scale / energy.clamp_min(1e-30), 0.0)  # [B]
                value = (diff.square().sum((1, 2)) * weight).sum()
                grad = (2 * diff * weight[:, None, None]).to(out.dtype)
            self._terms.append((block, value, grad))
            # the value is the teacher's output exactly; the gradient _LocalLoss gives the block output
            # reaches `out` through the zero term
            return target.to(out.dtype) + (out - out.detach())

        return hook
