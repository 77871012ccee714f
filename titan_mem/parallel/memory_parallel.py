"""Memory-parallel value tables: each rank of a memory-parallel group holds a column slice of the table.

Why: an FSDP-sharded 1M x 1024 table is all-gathered whole (2 GiB in bf16) for every micro-batch and its
dense 4 GiB fp32 gradient reduce-scattered, although a step reads a small fraction of its rows. Split along
the value dimension instead (as "Memory Layers at Scale", Berges et al. 2024, sec. 4, shard their values),
a lookup needs only the (indices, weights) of the group's tokens, which are tiny:

    forward   all-gather (indices, weights) of the group's tokens    [sum N, K] each
              local weighted lookup on the column shard             [sum N, D/P]
              all-to-all: every rank gets its tokens' full rows      [N, D]
    backward  all-to-all of the output gradient back by columns      [sum N, D/P]
              local lookup backward: the shard's gradient (dense or row-sparse) is already summed over the
              group's tokens -- no reduce inside the group; the weight gradient is a partial dot product
              over the shard's columns, summed over the group by a reduce-scatter (all-to-all + sum)

With a memory-parallel degree smaller than the data-parallel world, groups are replicas of each other and the
shard gradient is all-reduced across replicas (`replicate_group`). The parameter stays a plain local tensor
[M, D/P] (sparse COO gradients cannot live in a DTensor); checkpoints see it as a DTensor sharded on dim 1,
so DCP saves the global table and reshards on load when the group size changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from titan_mem.errors import ConfigError
from titan_mem.kernels import coalesced, value_lookup
from titan_mem.models.memory import MemoryLayer, MemoryValues

MESH_DIMS = ("mp_replicate", "mp")


@dataclass(frozen=True)
class ColumnShard:
    """Where one rank's column slice of a value table sits in its memory-parallel group."""

    mesh: DeviceMesh  # 2-D (replicas, memory-parallel ranks); the checkpoint view's mesh
    n_rows: int
    n_cols: int  # the full value dimension

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("mp")

    @property
    def size(self) -> int:
        return self.mesh.size(1)

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank("mp")

    @property
    def replicas(self) -> int:
        return self.mesh.size(0)

    @property
    def replicate_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("mp_replicate")

    @property
    def width(self) -> int:
        return self.n_cols // self.size

    @property
    def cols(self) -> slice:
        return slice(self.rank * self.width, (self.rank + 1) * self.width)

    @property
    def local_shape(self) -> tuple[int, int]:
        return (self.n_rows, self.width)

    def as_dtensor(self, local: torch.Tensor) -> DTensor:
        """The checkpoint view of a local [M, D/P] tensor: the global [M, D] table, shared storage."""
        return DTensor.from_local(
            local,
            self.mesh,
            [Replicate(), Shard(1)],
            run_check=False,
            shape=torch.Size((self.n_rows, self.n_cols)),
            stride=(self.n_cols, 1),
        )

    def to_local(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a table given as our DTensor view, another DTensor layout, or whole."""
        if isinstance(value, DTensor):
            if value.device_mesh == self.mesh and tuple(value.placements) == (Replicate(), Shard(1)):
                return value.to_local()
            value = value.full_tensor()
        if tuple(value.shape) == self.local_shape and self.size > 1 and value.shape[1] != self.n_cols:
            return value
        if tuple(value.shape) != (self.n_rows, self.n_cols):
            raise ValueError(
                f"memory-parallel table: expected [{self.n_rows}, {self.n_cols}] or the local "
                f"{list(self.local_shape)}, got {list(value.shape)}"
            )
        return value[:, self.cols]

    def columns_of(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's columns of whole rows [R, D] (rows already local pass through)."""
        return rows[:, self.cols] if rows.dim() == 2 and rows.shape[1] == self.n_cols else rows

    def gather_columns(self, local: torch.Tensor) -> torch.Tensor:
        """Whole rows [R, D] from every rank's columns [R, D/P] of the same rows (a collective)."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


def column_shard_of(table: torch.Tensor) -> ColumnShard | None:
    """The column shard a value-table parameter holds (None: whole, or FSDP-sharded by rows)."""
    return getattr(table, "column_shard", None)


def memory_parallel_mesh(device_type: str, world_size: int, degree: int) -> DeviceMesh:
    """A (replicas, degree) mesh over all ranks; degree -1 = all ranks (one group, no replicas)."""
    degree = world_size if degree == -1 else degree
    if degree < 1 or world_size % degree:
        raise ConfigError(
            f"parallelism.memory_parallel_degree: {degree} does not divide the {world_size} ranks"
        )
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=MESH_DIMS)


# ---------------------------------------------------------------------------------------------- collectives


def _sizes(n: int, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Every group rank's token count (ranks may hold different numbers, e.g. in evaluation)."""
    size = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] rows (padded to the largest n for the collective)."""
    top = max(sizes)
    pad = x.new_zeros((top, *x.shape[1:]))
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows [sum send, ...] split by `send` to the group's ranks; returns [sum recv, ...] by source rank."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def all_reduce_sparse_rows(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of every rank's row-sparse COO gradient over `group` (replicas of a memory-parallel group): the
    union of their rows, the same on every rank. Costs ranks x rows read x D/P, never the table."""
    grad = coalesced(grad)
    rows, vals = grad.indices()[0], grad.values()
    sizes = _sizes(rows.numel(), group, rows.device)
    all_rows, all_vals = _all_gather_rows(rows, sizes, group), _all_gather_rows(vals, sizes, group)
    return torch.sparse_coo_tensor(
        all_rows.unsqueeze(0), all_vals, grad.shape, check_invariants=False
    ).coalesce()


class _GatherBags(torch.autograd.Function):
    """(indices, weights) of all the group's tokens. Backward: rank r's weight gradient is partial (its
    columns only); token owner s receives every rank's partial for its tokens and sums them."""

    @staticmethod
    def forward(ctx, indices, weights, sizes, group):
        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        return _all_gather_rows(indices, sizes, group), _all_gather_rows(weights, sizes, group)

    @staticmethod
    def backward(ctx, _grad_indices, grad_weights):
        n_mine = ctx.sizes[ctx.rank]
        parts = _all_to_all(grad_weights, ctx.sizes, [n_mine] * len(ctx.sizes), ctx.group)
        return None, parts.view(len(ctx.sizes), n_mine, -1).sum(0), None, None


class _RowsByColumns(torch.autograd.Function):
    """[sum N, D/P] (all tokens, my columns) -> [N, D] (my tokens, all columns), by one all-to-all."""

    @staticmethod
    def forward(ctx, local_out, sizes, group):
        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        n_mine, p = sizes[ctx.rank], len(sizes)
        recv = _all_to_all(local_out, sizes, [n_mine] * p, group)  # [P * N, D/P] by source rank (= columns)
        return recv.view(p, n_mine, -1).permute(1, 0, 2).reshape(n_mine, -1)

    @staticmethod
    def backward(ctx, grad):
        n_mine, p = ctx.sizes[ctx.rank], len(ctx.sizes)
        by_cols = grad.reshape(n_mine, p, -1).permute(1, 0, 2).reshape(p * n_mine, -1)
        return _all_to_all(by_cols, [n_mine] * p, ctx.sizes, ctx.group), None, None


class _SumOverReplicas(torch.autograd.Function):
    """Identity whose backward all-reduces the (dense) shard gradient over replica groups."""

    @staticmethod
    def forward(ctx, table, group):
        ctx.group = group
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):
        if (
            grad.is_sparse
        ):  # reduced once per step: by the slot selector (selected rows) or the lazy-rows hook
            return grad, None
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def memory_parallel_lookup(
    local_table: torch.Tensor,
    shard: ColumnShard,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`value_lookup` on a column-sharded table: [N, K] bags of this rank's tokens -> [N, D] rows in
    `out_dtype` (the compute dtype; the shard is read in its own dtype and never cast whole). The local
    result is cast before the all-to-all, so the exchange moves compute-dtype bytes.

    Every rank of the group must call it (with its own tokens) in the same order.
    """
    if shard.size == 1 and shard.replicas == 1:
        return value_lookup(local_table, indices, weights, sparse_grad, backend, out_dtype)
    table = local_table
    if shard.replicas > 1 and local_table.requires_grad:
        table = _SumOverReplicas.apply(local_table, shard.replicate_group)
    if shard.size == 1:
        return value_lookup(table, indices, weights, sparse_grad, backend, out_dtype)
    sizes = _sizes(indices.shape[0], shard.group, indices.device)
    all_idx, all_w = _GatherBags.apply(indices, weights, sizes, shard.group)
    local_out = value_lookup(table, all_idx, all_w, sparse_grad, backend, out_dtype)
    return _RowsByColumns.apply(local_out, sizes, shard.group)


# ---------------------------------------------------------------------------------- applying it to a model


def _state_dict_view(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    shard = column_shard_of(module.weight)
    if shard is not None and key in state_dict and not isinstance(state_dict[key], DTensor):
        state_dict[key] = shard.as_dtensor(state_dict[key])


def _load_local_columns(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    shard = column_shard_of(module.weight)
    if shard is not None and key in state_dict:
        try:
            state_dict[key] = shard.to_local(state_dict[key])
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


class ColumnShardedValues(nn.Module):
    """A value table as this rank's column slice [M, D/P] of its memory-parallel group: the module
    parallelizing swaps in for a `models.memory.MemoryValues` (`shard_columns`), with the same face
    (`weight`, `backend`, `lookup`). Its lookup is `memory_parallel_lookup`; its state dict shows the global
    table (a DTensor sharded on dim 1) and loads any layout of it, so DCP reshards when the group changes.
    The shard also sits on `weight.column_shard` (`column_shard_of`): `parallel.value_grads` reads it once to
    choose the table's gradient path (the row optimizer takes it from there), and checkpoint I/O reads it to
    gather and split whole rows.
    """

    def __init__(self, whole: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype | None = None):
        super().__init__()
        weight = whole.weight
        self.shard = ColumnShard(mesh=mesh, n_rows=weight.shape[0], n_cols=weight.shape[1])
        if weight.shape[1] % self.shard.size:
            raise ConfigError(
                f"parallelism.memory_parallel_degree: value dim {weight.shape[1]} is not divisible by "
                f"{self.shard.size} ranks"
            )
        local = nn.Parameter(weight.detach()[:, self.shard.cols].clone(), requires_grad=weight.requires_grad)
        local.column_shard = self.shard
        self.weight = local
        self.backend = whole.backend
        # The shard stays fp32 (FSDP's mixed precision never sees it); its lookup *result* is cast to this
        # dtype (bf16 on GPU), never the table (kernels.value_lookup says why).
        self.compute_dtype = compute_dtype
        self.register_state_dict_post_hook(_state_dict_view)
        self.register_load_state_dict_pre_hook(_load_local_columns)

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
        """Weighted bags of rows [N, K] of this rank's tokens -> [N, D] whole rows (a group collective)."""
        return memory_parallel_lookup(
            self.weight, self.shard, indices, weights, sparse_grad, self.backend, out_dtype=self.compute_dtype
        )


def shard_columns(root: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype | None = None) -> None:
    """Swap every materialised `MemoryValues` under `root` for its `ColumnShardedValues` and re-point the
    memory layers under `root` that read it (a shared pool: call it on the model, which owns the pool). The
    whole table is initialised first (seeded), so the numbers never depend on the group size."""
    from_to: dict[int, ColumnShardedValues] = {}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MemoryValues):
                split = from_to.setdefault(id(child), ColumnShardedValues(child, mesh, compute_dtype))
                setattr(parent, name, split)
    for mod in root.modules():
        if isinstance(mod, MemoryLayer) and id(mod.value_table) in from_to:
            mod.use_value_table(from_to[id(mod.value_table)])


def column_sharded_params(model: nn.Module) -> dict[str, tuple[nn.Parameter, ColumnShard]]:
    """{parameter name: (local parameter, its shard)} for every column-sharded table (shared pools once)."""
    out = {}
    for name, p in model.named_parameters():
        shard = column_shard_of(p)
        if shard is not None:
            out[name] = (p, shard)
    return out


def _map_table_state(model: nn.Module, sd: dict[str, Any], fn: Any) -> dict[str, Any]:
    """`sd` with fn(shard, tensor) applied to the state of column-sharded tables; new dicts, because
    get_optimizer_state_dict shares its inner dicts with the live optimizer state."""
    state = dict(sd.get("state", {}))
    for name, (_, shard) in column_sharded_params(model).items():
        if name in state:
            state[name] = {k: fn(shard, v) for k, v in state[name].items()}
    return {**sd, "state": state}


def optimizer_state_view(model: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """Per-element optimizer state of column-sharded tables (AdamW moments) as DTensor views, so DCP stores
    the global state and reshards it like the table itself."""

    def view(shard: ColumnShard, v: Any) -> Any:
        is_local = isinstance(v, torch.Tensor) and tuple(v.shape) == shard.local_shape
        return shard.as_dtensor(v) if is_local and not isinstance(v, DTensor) else v

    return _map_table_state(model, sd, view)


def optimizer_state_local(model: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_state_view` after a load: each rank's columns as plain tensors."""
    return _map_table_state(model, sd, lambda shard, v: shard.to_local(v) if isinstance(v, DTensor) else v)
