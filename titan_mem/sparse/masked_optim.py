"""Masked-gradient SGD / AdamW for the memory value tables: the papers' sparse update, kept as an ablation.

Goyal et al. 2026, sec. 3.4 (like Lin et al. 2025's code) zero the gradient of the unselected rows and let a
dense optimizer step the whole table. With plain SGD that is the row-sparse update of `row_optim`; with
momentum, AdamW or weight decay it is not: rows selected earlier keep moving on their momentum, and weight
decay shrinks every row every step. `finetune.sparse_update=masked_gradient` reproduces that, breaking
docs/design.md invariant 4 on purpose, so a study can measure what masking the *update* (our default) changes.

Each step equals torch.optim.SGD / AdamW on the whole table fed the zero-masked dense gradient: every row
with optimizer state (ever selected) steps, with gradient 0 when not selected now; AdamW's bias correction
uses the global step count; weight decay multiplies every row, an O(n_slots * D) pass per step (acceptable
for an ablation; with weight decay 0 a step costs O(rows ever selected * D)). Rows never selected have zero
moments, so AdamW moves them by the decay alone (m = v = 0 gives a zero Adam update) and keeps no state for
them. SGD with momentum *and* weight decay puts the decay into every row's momentum buffer, so there the
state covers the whole table, as in torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titan_mem.sparse.update import RowSparseAdamW, RowSparseSGD, adamw_rows

_CHUNK = 1 << 16  # rows per chunk of the weight-decay pass: bounded temporaries on a 1M-row table


def _decay_every_row(
    table: torch.Tensor, active: torch.Tensor, decay: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """Apply `decay` in place to every row of `table`, chunk by chunk; return the squared change (float64
    scalar) of the rows outside `active`, whose final values the caller writes (and measures) itself."""
    skip = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
    skip[active] = True
    sq = torch.zeros((), dtype=torch.float64, device=table.device)
    for start in range(0, table.shape[0], _CHUNK):
        chunk = table[start : start + _CHUNK]
        old = chunk.double()
        decay(chunk)
        diff = chunk.double() - old
        diff[skip[start : start + _CHUNK]] = 0
        sq += diff.pow(2).sum()
    return sq


def _write_rows(table: torch.Tensor, active: torch.Tensor, w0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """table[active] = w (computed in state precision); the squared change of those rows from w0."""
    new = w.to(table.dtype)
    table.index_copy_(0, active, new)
    return (new.double() - w0.double()).pow(2).sum()


class MaskedGradientSGD(RowSparseSGD):
    """torch.optim.SGD (dampening 0, no Nesterov) on the whole table, gradient zero outside `rows`."""

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
        """One dense step; returns the squared norm of the change over every row (float64 scalar)."""
        self._check(rows, grad_rows)
        n_slots, d = self.table.shape
        dev = self.table.device
        if self.momentum:
            if self.weight_decay and self.n_state < n_slots:  # the decay enters every row's buffer
                self._state_rows(torch.arange(n_slots, dtype=torch.int64, device=dev))
            sel = self._state_rows(rows)
            active = self.state_slots[: self.n_state]
        else:  # no state: only this step's rows get a gradient
            sel, active = torch.arange(rows.numel(), device=dev), rows
        g = torch.zeros(active.numel(), d, dtype=self.state_dtype, device=dev)
        g.index_copy_(0, sel, grad_rows.to(self.state_dtype))
        w0 = self.table.index_select(0, active)
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        if self.weight_decay and active.numel() < n_slots:  # rows without gradient: p - lr * (wd * p)
            lr, wd = self.lr, self.weight_decay
            sq = _decay_every_row(self.table, active, lambda c: c.add_(c * wd, alpha=-lr))
        if active.numel() == 0:
            return sq
        w = w0.to(self.state_dtype, copy=True)  # w0 stays the old values
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        if self.momentum:
            g = self.state("momentum_buffer").mul_(self.momentum).add_(g)
        w.add_(g, alpha=-self.lr)
        return sq + _write_rows(self.table, active, w0, w)


class MaskedGradientAdamW(RowSparseAdamW):
    """torch.optim.AdamW on the whole table, gradient zero outside `rows`; one global step count."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, table: torch.Tensor, lr: float, **kwargs) -> None:
        super().__init__(table, lr, **kwargs)
        self.n_steps = 0  # the global step (AdamW's bias correction), saved with the hyper-parameters

    def _hyper(self) -> dict[str, float]:
        return {**super()._hyper(), "n_steps": self.n_steps}

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
        """One dense step; returns the squared norm of the change over every row (float64 scalar)."""
        self._check(rows, grad_rows)
        self.n_steps = int(self.n_steps) + 1
        d, dev = self.table.shape[1], self.table.device
        sel = self._state_rows(rows)  # rows selected for the first time start from zero moments
        active = self.state_slots[: self.n_state]
        w0 = self.table.index_select(0, active)
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        if self.weight_decay:  # AdamW's decoupled decay, p *= 1 - lr * wd, on every row
            factor = 1 - self.lr * self.weight_decay
            sq = _decay_every_row(self.table, active, lambda c: c.mul_(factor))
        if active.numel() == 0:
            return sq
        g = torch.zeros(active.numel(), d, dtype=self.state_dtype, device=dev)
        g.index_copy_(0, sel, grad_rows.to(self.state_dtype))
        w = w0.to(self.state_dtype, copy=True)  # w0 stays the old values
        step = torch.full((active.numel(),), float(self.n_steps), dtype=torch.float64, device=dev)
        m, v = self.state("exp_avg"), self.state("exp_avg_sq")  # views: updated in place
        betas = (self.beta1, self.beta2)
        adamw_rows(w, g, m, v, step, self.lr, betas, self.eps, self.weight_decay)
        return sq + _write_rows(self.table, active, w0, w)


# What `RowSparseOptimizer(..., masked_updaters=...)` steps the tables with under the ablation.
MASKED_UPDATERS = (MaskedGradientSGD, MaskedGradientAdamW)
