"""The optimizer of sparse memory finetuning: row-sparse SGD/AdamW over the value tables, behind the
`torch.optim.Optimizer` face the LR scheduler drives.

It reads each table's gradient as a sparse COO tensor holding exactly the selected rows (the slot selector
puts it there) and updates those rows only. It also remembers every row it has ever updated and that row's
value before the first update: a sparse checkpoint is exactly that (a knowledge patch), so its size follows
the rows selected, never the table.

`sparse_update="masked_gradient"` (an ablation, `masked_optim`) instead steps the whole table as a dense
optimizer fed the zero-masked gradient would: rows outside the selection move too, so it keeps no patch.

On a memory-parallel (column-sharded) table every rank updates its columns of the same rows; what leaves
the optimizer for a checkpoint (changed rows, row state) is gathered to whole rows, and split again on load.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.masked_optim import MaskedGradientAdamW, MaskedGradientSGD
from titan_mem.sparse.row_optim import RowSparseAdamW, RowSparseSGD


class RowSparseOptimizer(torch.optim.Optimizer):
    """Row-sparse updates of the memory value tables (`tables`: layer name -> table; shared pools once).
    `sparse_update`: "rows" (mask the update, DESIGN.md invariant 4) or "masked_gradient" (the ablation)."""

    def __init__(
        self,
        tables: dict[str, nn.Parameter],
        cfg: Any,
        value_grads: dict[str, ValueTableGrad],
        sparse_update: str = "rows",
    ):
        if sparse_update not in ("rows", "masked_gradient"):
            raise ValueError(f"finetune.sparse_update: expected rows or masked_gradient; got {sparse_update}")
        self.masked = sparse_update == "masked_gradient"
        sgd, adamw = (RowSparseSGD, RowSparseAdamW)
        if self.masked:
            sgd, adamw = MaskedGradientSGD, MaskedGradientAdamW
        unique: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in tables.items():
            unique.setdefault(id(p), (name, p))
        self.tables = {name: p for name, p in unique.values()}  # first layer name of each table
        self.value_grads = value_grads
        lr = cfg.lr if cfg.memory_lr is None else cfg.memory_lr  # the value rows' rate, as in pretraining
        super().__init__(
            [{"params": list(self.tables.values()), "lr": lr, "name": "memory_values"}], {"lr": lr}
        )
        self.updaters: dict[str, RowSparseSGD | RowSparseAdamW] = {}
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
            grad = grad.coalesce()
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
