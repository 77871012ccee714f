"""How each memory value table's gradient is summed over ranks, measured for clipping and stepped: the one
place that decides it, per training mode and table layout (`value_table_grads`, called once by the Trainer).

  mode (memory update)    layout (memory_parallel)  gradient        summed over ranks by         optimizer
  pretrain, full (dense)  rows, FSDP-sharded (0)    dense           FSDP reduce-scatter [1]      AdamW
  pretrain, full (dense)  columns (!= 0)            dense, my cols  replicas only [2]            AdamW
  pretrain, full (lazy)   columns                   rows read       replicas: sum_rows_read [3]  LazyRowAdamW
  sparse_finetune         whole on every rank (0)   selected rows   all: sum_selected_rows [4]   RowSparseOpt.
  sparse_finetune         columns                   selected rows   replicas: sum_selected_rows  RowSparseOpt.
  lora_finetune           either, frozen            none            -                            -

[1] in backward, FSDP's own; clipped with the other FSDP gradients (a DTensor norm). Every other row is a
    `ValueTableGrad`, clipped by `components.optim.clip_grad_norm_` through `squared_norm` and `scale`.
[2] nothing inside a column group: the lookup's all-to-all already routed every token of the group to the
    shard, so its gradient is the group's sum; across replica groups an all-reduce in backward
    (`memory_parallel._SumOverReplicas`). Norms of column shards sum their squares over the group.
[3] once per step, before clipping (`modes.pretrain.SumRowsReadOverReplicas`): the union of the rows read.
[4] by the slot selector (`sparse.select`), for the rows it selected, before clipping; the rows are
    then stepped by `sparse.update.RowSparseOptimizer` ("RowSparseOpt.").

Why value tables have paths of their own: sparse COO gradients cannot live in FSDP's DTensors, and a column
shard's gradient is already its group's sum, so FSDP's reduce-scatter would be wrong for it twice over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from titan_mem.distributed import all_reduce_sum
from titan_mem.kernels import coalesced
from titan_mem.parallel.memory_parallel import ColumnShard, all_reduce_sparse_rows, column_shard_of

LAYOUTS = ("fsdp_rows", "whole", "columns")


@dataclass(frozen=True)
class ValueTableGrad:
    """The gradient path of one value table (a row of the module's table)."""

    table: nn.Parameter
    layout: str  # LAYOUTS
    shard: ColumnShard | None = None  # layout "columns"

    def sum_selected_rows(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """[R, width] gradient of rows every rank selected alike (same order), summed over the ranks whose
        tokens it lacks: every rank for a whole table, the replicas for a column shard. In place."""
        if self.layout == "whole":
            return all_reduce_sum(grad_rows)
        if self.layout == "columns" and self.shard.replicas > 1:
            dist.all_reduce(grad_rows, group=self.shard.replicate_group)
        return grad_rows

    def sum_rows_read(self, grad: torch.Tensor) -> torch.Tensor:
        """A row-sparse gradient of the rows this rank read, summed over the replicas of its column group:
        the union of their rows, the same on every replica; coalesced."""
        if self.layout == "columns" and self.shard.replicas > 1:
            return all_reduce_sparse_rows(grad, self.shard.replicate_group)
        return coalesced(grad)

    def sum_over_columns(self, value: torch.Tensor) -> torch.Tensor:
        """A per-row quantity measured on this rank's columns (a sum of squares), made the whole table's by
        summing over the column group. In place."""
        if self.layout == "columns" and self.shard.size > 1:
            dist.all_reduce(value, group=self.shard.group)
        return value

    def squared_norm(self) -> torch.Tensor:
        """Sum of squares of the whole table's gradient (fp64; zero without one)."""
        grad = self.table.grad
        if grad is None:
            return torch.zeros((), dtype=torch.float64)
        values = coalesced(grad).values() if grad.is_sparse else grad
        return self.sum_over_columns(values.double().pow(2).sum())

    @torch.no_grad()
    def scale(self, coef: float) -> None:
        """Multiply the gradient by `coef` (clipping), keeping a sparse one coalesced."""
        grad = self.table.grad
        if grad is None:
            return
        if grad.is_sparse:
            g = coalesced(grad)
            self.table.grad = torch.sparse_coo_tensor(
                g.indices(), g.values() * coef, g.shape, is_coalesced=True, check_invariants=False
            )
        else:
            grad.mul_(coef)


def layout_of(table: nn.Parameter) -> str:
    """Where a value table's rows live: FSDP-sharded (a DTensor), split by columns, or whole on every rank."""
    if isinstance(table, DTensor):
        return "fsdp_rows"
    return "columns" if column_shard_of(table) is not None else "whole"


def value_table_grads(tables: Mapping[str, nn.Parameter]) -> dict[str, ValueTableGrad]:
    """The gradient path of every value table outside FSDP (`tables`: a model's `value_tables()`), by its
    first memory layer's name (a shared pool once). Row-FSDP tables are left to FSDP (the table's first
    row)."""
    paths: dict[str, ValueTableGrad] = {}
    seen: set[int] = set()
    for name, table in tables.items():
        if id(table) in seen:
            continue
        seen.add(id(table))
        layout = layout_of(table)
        if layout != "fsdp_rows":
            paths[name] = ValueTableGrad(table, layout, column_shard_of(table))
    return paths
