"""Lazy row-sparse AdamW for pretraining the memory value tables: a step costs O(rows read x D), not O(M x D).

A pretraining step reads a small fraction of a 1M-row table (tokens x heads x k rows at most), and the
lookup's row-sparse backward hands over exactly those rows. Dense AdamW would still read and write all M
rows and both moments every step (three [M, D] passes), which is the cost the memory layer exists to avoid.

How it differs from dense AdamW (torch.optim.AdamW), for a row *not* read in a step:
  - dense: its gradient counts as zero, so m and v decay (m <- b1 m, v <- b2 v), the row still moves by
    lr * m_hat / (sqrt(v_hat) + eps) from its old momentum, and decoupled weight decay shrinks it;
  - lazy (here, as TensorFlow's LazyAdam and torch.optim.SparseAdam): nothing happens to the row or its
    moments. Its step count s is per row and advances only when the row is read, so a row's k-th update
    is dense AdamW applied to that row alone k times (the bias corrections use its own s, not the global
    step; SparseAdam uses the global step). Weight decay applies to read rows only.
So lazy == dense exactly when every row is read every step; otherwise the rows' momentum "freezes" while
unread. `tools/bench_lazy_adamw.py` measures the loss difference this makes on a short pretraining run.

Every other parameter gets torch.optim.AdamW unchanged (same object, same LR schedule and param groups).
State of a lazy table: AdamW's own (step, exp_avg, exp_avg_sq) plus row_step ([M], float32 like AdamW's
step, so checkpoint loading keeps its dtype); DCP saves and reshards it like any optimizer state, and a
dense AdamW run can resume from it (its global step counts the lazy steps).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from titan_mem.kernels import coalesced
from titan_mem.sparse.update import adamw_rows


class LazyRowAdamW(torch.optim.AdamW):
    """AdamW whose `lazy_params` (memory value tables) are updated only on the rows their gradient holds.

    A lazy parameter's gradient is a sparse COO tensor over the rows read (see kernels.value_lookup,
    `sparse_grad=True`); a dense gradient counts as every row read (checkpoint loading initialises the
    state with a zero dense gradient at lr 0, which leaves the table unchanged).
    """

    def __init__(self, params: Iterable, lazy_params: Iterable[nn.Parameter], **kwargs) -> None:
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("LazyRowAdamW: amsgrad and maximize are not supported")
        super().__init__(params, **kwargs)
        self.lazy_params = list({id(p): p for p in lazy_params}.values())
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [tuple(p.shape) for p in self.lazy_params if id(p) not in in_groups]
        if missing:
            raise ValueError(f"LazyRowAdamW: lazy parameters {missing} are not in any parameter group")

    def _group_of(self, p: nn.Parameter) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim's signature)
        """Dense AdamW for everything else, then the lazy rows; each parameter is updated once."""
        held = [(p, p.grad) for p in self.lazy_params if p.grad is not None]
        for p, _ in held:
            p.grad = None  # hidden from AdamW (which refuses sparse gradients)
        try:
            loss = super().step(closure)
        finally:
            for p, grad in held:
                p.grad = grad
        for p, grad in held:
            self._lazy_step(p, grad, self._group_of(p))
        return loss

    def _lazy_step(self, p: nn.Parameter, grad: torch.Tensor, group: dict) -> None:
        if grad.is_sparse:
            grad = coalesced(grad)
            rows, grad_rows = grad.indices()[0], grad.values()
        else:
            rows, grad_rows = torch.arange(p.shape[0], device=p.device), grad
        if rows.numel() == 0:
            return
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # steps taken (AdamW's key, so the state loads as AdamW's)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        elif "row_step" not in state:
            raise ValueError(
                "LazyRowAdamW: the memory value table's optimizer state has no row_step (it was saved by "
                "dense AdamW: optimizer.memory_update=dense)"
            )
        state["step"] += 1
        w = p.index_select(0, rows).float()
        m = state["exp_avg"].index_select(0, rows).float()
        v = state["exp_avg_sq"].index_select(0, rows).float()
        step = state["row_step"].index_select(0, rows) + 1
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        adamw_rows(w, grad_rows.float(), m, v, step, lr, (beta1, beta2), group["eps"], group["weight_decay"])
        state["row_step"].index_copy_(0, rows, step)
        state["exp_avg"].index_copy_(0, rows, m.to(state["exp_avg"].dtype))
        state["exp_avg_sq"].index_copy_(0, rows, v.to(state["exp_avg_sq"].dtype))
        p.index_copy_(0, rows, w.to(p.dtype))
