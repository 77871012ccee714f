"""Row-sparse optimizers for memory value tables: each step costs O(rows updated * D), never O(n_slots * D).

`step(rows, grad_rows)` reads, updates and writes back only `table[rows]` (index_select / index_copy_), so
every other row stays bit-identical whatever the momentum or weight decay. Optimizer state exists only for
rows that have ever been updated: state row s belongs to slot `state_slots[s]`, and a slot -> state-row map
(int64 [n_slots], allocated once, 8 bytes a slot: 1/128 of one fp32 value row per slot at D=1024, and no
per-step O(n_slots) work) finds them. State tensors grow by doubling.

The optimizer of sparse memory finetuning: row-sparse SGD/AdamW over the value tables, behind the
`torch.optim.Optimizer` face the LR scheduler drives.

It reads each table's gradient as a sparse COO tensor holding exactly the selected rows (the slot selector
puts it there) and updates those rows only. It also remembers every row it has ever updated and that row's
value before the first update: a sparse checkpoint is exactly that (a knowledge patch), so its size follows
the rows selected, never the table.

`finetune.sparse_update="masked_gradient"` (an ablation, `masked_optim` passes its updaters) instead steps the
whole table as a dense optimizer fed the zero-masked gradient would: rows outside the selection move too, so
it keeps no patch.

On a memory-parallel (column-sharded) table every rank updates its columns of the same rows; what leaves
the optimizer for a checkpoint (changed rows, row state) is gathered to whole rows, and split again on load.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from titan_mem.kernels import coalesced
from titan_mem.parallel.value_grads import ValueTableGrad


def value_row_lr(cfg: Any) -> float:
    """The learning rate of memory value rows: `optimizer.memory_lr`, else `optimizer.lr` (the same rule in
    pretraining's parameter groups and in sparse finetuning)."""
    return cfg.lr if cfg.memory_lr is None else cfg.memory_lr


class RowUpdater:
    """Shared bookkeeping: argument checks, the slot -> state-row map and growable per-row state."""

    _state_names: tuple[str, ...] = ()

    def __init__(self, table: torch.Tensor, lr: float) -> None:
        if table.dim() != 2:
            raise ValueError(f"row-sparse optimizer: table must be [n_slots, D], got {tuple(table.shape)}")
        self.table = table
        self.lr = float(lr)
        # fp32 state for low-precision tables, like mixed-precision optimizers keep master statistics.
        self.state_dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
        self.n_state = 0
        self._slot_to_state: torch.Tensor | None = None  # allocated on the first step that needs state
        self.state_slots = torch.empty(0, dtype=torch.int64, device=table.device)
        self._state: dict[str, torch.Tensor] = {}

    def set_lr(self, lr: float) -> None:
        """Set the lr for the next steps (the trainer's LR schedule drives this)."""
        self.lr = float(lr)

    def _check(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        n, d = self.table.shape
        if rows.dim() != 1 or rows.dtype != torch.int64:
            raise ValueError(f"row-sparse step: rows must be 1-D int64, got {rows.dtype} {tuple(rows.shape)}")
        if grad_rows.shape != (rows.numel(), d):
            raise ValueError(
                f"row-sparse step: grad_rows must be [{rows.numel()}, {d}], got {tuple(grad_rows.shape)}"
            )
        if rows.numel():
            lo, hi = int(rows.min().item()), int(rows.max().item())
            if lo < 0 or hi >= n:
                raise ValueError(f"row-sparse step: rows span [{lo}, {hi}], outside [0, {n})")
            # index_copy_ with a repeated row would keep an arbitrary one of the updates.
            if torch.unique(rows).numel() != rows.numel():
                raise ValueError("row-sparse step: rows must be unique")

    def _state_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """State-row index of each of `rows`, giving never-seen rows fresh zero state."""
        if self._slot_to_state is None:
            self._slot_to_state = self._new_map()
        idx = self._slot_to_state[rows]
        new = rows[idx < 0]
        if new.numel():
            start = self.n_state
            self._reserve(start + new.numel())
            fresh = torch.arange(start, start + new.numel(), dtype=torch.int64, device=rows.device)
            self._slot_to_state[new] = fresh
            self.state_slots[start : start + new.numel()] = new
            self.n_state += new.numel()
            idx = self._slot_to_state[rows]
        return idx

    def _reserve(self, need: int) -> None:
        cap = self.state_slots.numel()
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        grow = new_cap - cap
        dev = self.table.device
        pad = torch.full((grow,), -1, dtype=torch.int64, device=dev)
        self.state_slots = torch.cat([self.state_slots, pad])
        for name in self._state_names:
            old = self._state[name] if name in self._state else self._empty_state(name, 0)
            self._state[name] = torch.cat([old, self._empty_state(name, grow)])

    def _new_map(self) -> torch.Tensor:
        return torch.full((self.table.shape[0],), -1, dtype=torch.int64, device=self.table.device)

    def _empty_state(self, name: str, n: int) -> torch.Tensor:
        d, dev = self.table.shape[1], self.table.device
        if name == "row_step":
            return torch.zeros(n, dtype=torch.int64, device=dev)
        return torch.zeros(n, d, dtype=self.state_dtype, device=dev)

    def state(self, name: str) -> torch.Tensor:
        """State `name` of the rows updated so far, row s belonging to slot state_slots[s]."""
        return self._state[name][: self.n_state] if name in self._state else self._empty_state(name, 0)

    def _hyper(self) -> dict[str, float]:
        return {"lr": self.lr}

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and floats/ints only (for torch.distributed.checkpoint), trimmed to used rows."""
        out: dict[str, Any] = dict(self._hyper())
        out["n_state"] = self.n_state
        out["state_slots"] = self.state_slots[: self.n_state].clone()
        for name in self._state_names:
            out[name] = self.state(name).clone()
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a `state_dict()`; continuing afterwards gives the same updates as never stopping."""
        n = int(sd["n_state"])
        slots = sd["state_slots"].to(self.table.device, torch.int64)
        if slots.shape != (n,):
            raise ValueError(f"row-sparse load_state_dict: state_slots {tuple(slots.shape)} but n_state={n}")
        if n and (int(slots.min()) < 0 or int(slots.max()) >= self.table.shape[0]):
            raise ValueError("row-sparse load_state_dict: state_slots outside the table")
        for name in self._state_names:
            want = self._empty_state(name, n).shape
            if tuple(sd[name].shape) != tuple(want):
                raise ValueError(
                    f"row-sparse load_state_dict: {name} is {tuple(sd[name].shape)}, want {tuple(want)}"
                )
        for key in self._hyper():
            setattr(self, key, float(sd[key]))
        self.n_state = 0
        self.state_slots = torch.empty(0, dtype=torch.int64, device=self.table.device)
        self._state = {}
        self._slot_to_state = None
        if n:
            self._reserve(n)
            self.state_slots[:n] = slots
            self._slot_to_state = self._new_map()
            self._slot_to_state[slots] = torch.arange(n, dtype=torch.int64, device=self.table.device)
            for name in self._state_names:
                self._state[name][:n] = sd[name].to(self._state[name].device, self._state[name].dtype)
            self.n_state = n


class RowSparseSGD(RowUpdater):
    """SGD on selected rows, with torch.optim.SGD's rule (dampening 0, no Nesterov) restricted to them:

    g <- g + weight_decay * w;  b <- momentum * b + g (b starts at 0, so the first b = g);  w <- w - lr * b.
    Momentum state is kept only when momentum != 0; SMF's default (Lin et al. 2025) is plain SGD.
    """

    def __init__(
        self, table: torch.Tensor, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(table, lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._state_names = ("momentum_buffer",) if self.momentum != 0.0 else ()

    def _hyper(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Update table[rows] in place from their gradients grad_rows [t, D]; no other row is written."""
        self._check(rows, grad_rows)
        if rows.numel() == 0:
            return
        w = self.table.index_select(0, rows).to(self.state_dtype)
        g = grad_rows.to(self.state_dtype)
        if self.weight_decay:
            g = g.add(w, alpha=self.weight_decay)
        if self.momentum:
            sidx = self._state_rows(rows)
            buf = self._state["momentum_buffer"].index_select(0, sidx).mul_(self.momentum).add_(g)
            self._state["momentum_buffer"].index_copy_(0, sidx, buf)
            g = buf
        w.add_(g, alpha=-self.lr)
        self.table.index_copy_(0, rows, w.to(self.table.dtype))


class RowSparseAdamW(RowUpdater):
    """AdamW on selected rows (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Alg. 2).

    Per row, in torch.optim.AdamW's order: w <- w * (1 - lr * wd) (decoupled decay, only on the rows
    updated); m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; w <- w - lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s)
    + eps). The step count s is per row and advances only when that row is updated, so a row's k-th update
    equals dense AdamW applied to that row alone k times (its bias correction does not shrink while it is
    not selected, unlike a global counter).
    """

    _state_names = ("exp_avg", "exp_avg_sq", "row_step")

    def __init__(
        self,
        table: torch.Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(table, lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _hyper(self) -> dict[str, float]:
        return {
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Update table[rows] in place from grad_rows [t, D]; no other row or its state is written."""
        self._check(rows, grad_rows)
        if rows.numel() == 0:
            return
        sidx = self._state_rows(rows)
        st = self._state
        w = self.table.index_select(0, rows).to(self.state_dtype)
        step = st["row_step"].index_select(0, sidx) + 1
        m = st["exp_avg"].index_select(0, sidx)
        v = st["exp_avg_sq"].index_select(0, sidx)
        adamw_rows(
            w,
            grad_rows.to(self.state_dtype),
            m,
            v,
            step,
            self.lr,
            (self.beta1, self.beta2),
            self.eps,
            self.weight_decay,
        )
        st["row_step"].index_copy_(0, sidx, step)
        st["exp_avg"].index_copy_(0, sidx, m)
        st["exp_avg_sq"].index_copy_(0, sidx, v)
        self.table.index_copy_(0, rows, w.to(self.table.dtype))


def adamw_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of gathered rows, in place on w, m, v ([R, D], fp32/fp64), in torch.optim.AdamW's
    order (Loshchilov & Hutter 2019, Alg. 2): w <- w (1 - lr wd); m <- b1 m + (1-b1) g;
    v <- b2 v + (1-b2) g^2; w <- w - lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s) + eps), with s = `step` [R]
    already advanced, per row. The one definition shared by sparse finetuning's row optimizer and
    pretraining's lazy AdamW."""
    beta1, beta2 = betas
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    s = step.to(torch.float64)
    step_size = (lr / (1 - beta1**s)).to(w.dtype).unsqueeze(1)
    bc2_sqrt = torch.sqrt(1 - beta2**s).to(w.dtype).unsqueeze(1)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    w.sub_(m / denom * step_size)


class RowSparseOptimizer(torch.optim.Optimizer):
    """Row-sparse updates of the memory value tables (`tables`: layer name -> table; shared pools once).
    Masks the update (docs/design.md, invariant 4); `masked_updaters` (SGD, AdamW classes of
    `masked_optim`) instead mask only the gradient, the papers' ablation (`finetune.sparse_update`)."""

    def __init__(
        self,
        tables: dict[str, nn.Parameter],
        cfg: Any,
        value_grads: dict[str, ValueTableGrad],
        masked_updaters: tuple[type[RowUpdater], type[RowUpdater]] | None = None,
    ):
        self.masked = masked_updaters is not None
        sgd, adamw = masked_updaters or (RowSparseSGD, RowSparseAdamW)
        unique: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in tables.items():
            unique.setdefault(id(p), (name, p))
        self.tables = {name: p for name, p in unique.values()}  # first layer name of each table
        self.value_grads = value_grads
        lr = value_row_lr(cfg)
        super().__init__(
            [{"params": list(self.tables.values()), "lr": lr, "name": "memory_values"}], {"lr": lr}
        )
        self.updaters: dict[str, RowUpdater] = {}
        for name, p in self.tables.items():
            if cfg.name == "sgd":
                self.updaters[name] = sgd(
                    p.data, lr=lr, momentum=cfg.momentum, weight_decay=cfg.memory_weight_decay
                )
            else:
                self.updaters[name] = adamw(
                    p.data, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.memory_weight_decay
                )
        empty = {name: torch.empty(0, dtype=torch.int64, device=p.device) for name, p in self.tables.items()}
        self._rows_ever: dict[str, torch.Tensor] = dict(empty)
        self._base_rows: dict[str, torch.Tensor] = {
            name: p.data.new_empty(0, p.shape[1]) for name, p in self.tables.items()
        }
        self.last_update_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch signature
        lr = self.param_groups[0]["lr"]
        sq = 0.0
        for name, table in self.tables.items():
            grad = table.grad
            if grad is None:
                continue
            if not grad.is_sparse:
                raise RuntimeError(
                    f"row-sparse optimizer: '{name}' has a dense gradient (no slot selection?)"
                )
            grad = coalesced(grad)
            rows, grad_rows = grad.indices()[0], grad.values()
            updater = self.updaters[name]
            updater.set_lr(lr)
            if self.masked:  # every row may move: the updater measures the change over the whole table
                change = updater.step(rows, grad_rows)
            else:
                self._remember(name, rows)
                before = table.data.index_select(0, rows)
                updater.step(rows, grad_rows)
                change = (table.data.index_select(0, rows) - before).double().pow(2).sum()
            sq += float(self.value_grads[name].sum_over_columns(change))  # whole rows: every column
        self.last_update_norm = sq**0.5

    def _remember(self, name: str, rows: torch.Tensor) -> None:
        """Add never-updated `rows` to the patch, with their values before this (first) update."""
        seen = self._rows_ever[name]
        new = rows[~torch.isin(rows, seen)] if seen.numel() else rows
        if new.numel() == 0:
            return
        base = self.tables[name].data.index_select(0, new)
        rows_all = torch.cat([seen, new])
        order = torch.argsort(rows_all)
        self._rows_ever[name] = rows_all[order]
        self._base_rows[name] = torch.cat([self._base_rows[name], base])[order]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.tables.values():
            p.grad = None

    # ------------------------------------------------------------------ what a sparse checkpoint holds

    def _whole_rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Per-row tensors [R, D/P] of a column-sharded table as whole rows [R, D] (a collective)."""
        shard = self.value_grads[name].shard
        if shard is None or t.dim() != 2 or t.shape[1] != shard.width:
            return t
        return shard.gather_columns(t)

    def _own_columns(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shard = self.value_grads[name].shard
        return t if shard is None else shard.columns_of(t)

    def changed_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{table: (rows ever updated (sorted), their base values, their current values)}, whole rows
        (every rank must call it when a table is column-sharded)."""
        if self.masked:
            raise RuntimeError("finetune.sparse_update=masked_gradient moves rows never selected: no patch")
        return {
            name: (
                rows,
                self._whole_rows(name, self._base_rows[name]),
                self._whole_rows(name, self.tables[name].data.index_select(0, rows)),
            )
            for name, rows in self._rows_ever.items()
        }

    def restore_changed_rows(self, name: str, rows: torch.Tensor, base_rows: torch.Tensor) -> None:
        """After a resume: the rows updated so far and their base values (from the patch, whole rows)."""
        dev = self.tables[name].device
        self._rows_ever[name] = rows.to(dev, torch.int64)
        self._base_rows[name] = self._own_columns(name, base_rows.to(dev, self.tables[name].dtype))

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Row-optimizer state as flat tensors + JSON metadata (a safetensors file: loading runs no code)."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for name, updater in self.updaters.items():
            for key, value in updater.state_dict().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = self._whole_rows(name, value.detach()).cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
        meta = {"lr": json.dumps(self.param_groups[0]["lr"]), "scalars": json.dumps(scalars)}
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Restore `state_tensors()`; state lands on each table's own device (not the saving rank's)."""
        scalars = json.loads(meta["scalars"])
        for name, updater in self.updaters.items():
            device = self.tables[name].device
            sd: dict[str, Any] = dict(scalars.get(name, {}))
            prefix = f"{name}/"
            for key, t in tensors.items():
                if key.startswith(prefix):
                    sd[key[len(prefix) :]] = self._own_columns(name, t.to(device))
            updater.load_state_dict(sd)
        self.param_groups[0]["lr"] = float(json.loads(meta["lr"]))
