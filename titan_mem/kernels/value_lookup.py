"""The memory value lookup behind one function, so faster kernels and sharded tables can replace it.

out[n] = sum_j weights[n, j] * values[indices[n, j]]   (a weighted bag of value rows per token)

The table is read in its storage dtype (fp32 master weights in mixed precision) and only the [N, D] result is
cast to the compute dtype (`out_dtype`): casting the table instead would read, write and allocate [M, D] on
every micro-batch (and again in an activation-checkpoint recompute), which at 1M x 1024 is 6 GiB of traffic
against ~2 GiB for reading a micro-batch's fp32 rows, and would make a sparse finetuning step O(M).

Two backends: PyTorch (`embedding_bag`, the CPU path and the tests' oracle) and Triton kernels with a
row-sparse backward (`triton_lookup`), picked per call by `backend`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from titan_mem.errors import ConfigError

# The one list of lookup backends. "auto": Triton for plain CUDA tensors when triton is installed, else torch.
LookupBackend = Literal["auto", "torch", "triton"]  # training.memory_kernel
LOOKUP_BACKENDS: tuple[str, ...] = get_args(LookupBackend)


class _RowSparseLookup(torch.autograd.Function):
    """Lookup whose table gradient is a sparse COO tensor over the *unique* rows touched.

    Sparse finetuning needs the table gradient at a cost that scales with the rows touched: dense autograd
    allocates and zero-fills [n_slots, D] (2 GiB at 1M x 512 fp32) for a few thousand rows, and
    `embedding_bag(sparse=True)` keeps one row per access (tokens x heads x k). Here the accesses are
    renumbered over the U unique rows (a bitmap and a prefix sum over the slots: O(M + N*K), no sort) and
    embedding_bag's own backward kernels run on that compact [U, D] table: the same arithmetic as the dense
    gradient (up to the order of equal-row sums) in O(U x D) memory; the weights' gradient is the kernel the
    dense path uses too. Rows a step will not update can be left out before the backward
    (`restrict_row_grads`): their gradient would only be dropped.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, indices, weights)
        ctx.table = values if values.is_leaf else None  # where restrict_row_grads leaves its mask
        return _embedding_bag(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, weights = ctx.saved_tensors
        n, k = indices.shape
        flat, w = indices.reshape(-1), weights.reshape(-1).to(values.dtype)
        grad = grad_out.to(values.dtype).contiguous()
        bag = torch.arange(n, device=flat.device).repeat_interleave(k)  # the token of each access
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            keep = getattr(ctx.table, GRAD_ROWS_ATTR, None)
            if keep is None:
                rows_read, bag_read, w_read = flat, bag, w
            else:  # only the accesses of rows the step updates (restrict_row_grads)
                at = keep[flat].nonzero().squeeze(1)
                rows_read, bag_read, w_read = flat[at], bag[at], w[at]
            touched = torch.zeros(values.shape[0], dtype=torch.bool, device=flat.device)
            touched[rows_read] = True
            uniq = touched.nonzero().squeeze(1)
            # every row touched (a small table): the accesses are their own compact numbering
            every_row = uniq.numel() == values.shape[0]
            compact = rows_read if every_row else (torch.cumsum(touched, 0) - 1)[rows_read]
            rows = torch.ops.aten._embedding_bag_dense_backward(
                grad, compact, bag_read, torch.full((n,), k, dtype=torch.long, device=flat.device),
                flat.new_empty(0), uniq.numel(), False, 0, w_read,
            )  # fmt: skip
            grad_values = torch.sparse_coo_tensor(
                uniq.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
            )
        if ctx.needs_input_grad[2]:
            # d out[n] / d w[n, j] = <values[indices[n, j]], grad_out[n]>: embedding_bag's fused kernel
            offsets = torch.arange(0, n * k, k, device=flat.device)
            grad_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, values, flat, offsets, bag, 0
            )
            grad_weights = grad_weights.view(n, k).to(weights.dtype)
        return grad_values, None, grad_weights


GRAD_ROWS_ATTR = "grad_rows_only"  # the bool row mask restrict_row_grads leaves on a table


def restrict_row_grads(table: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Until called again with None, the row-sparse backward of `table` (a leaf: the Parameter a lookup
    reads) computes gradient rows for `rows` only. A sparse finetune updates the top-t rows of those a step
    read (sparse/select.py) and chooses them from the forward's slot counts, so it can say which before the
    backward: at 4K-64K slots a batch reads nearly every row, and their gradient would only be dropped.
    The Triton kernel and a table summed over replicas (a non-leaf) ignore it and compute every row read."""
    if rows is None:
        if hasattr(table, GRAD_ROWS_ATTR):
            delattr(table, GRAD_ROWS_ATTR)
        return
    mask = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
    mask[rows.to(table.device)] = True
    setattr(table, GRAD_ROWS_ATTR, mask)


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()` without its sort where the rows are already sorted and unique: autograd drops the
    coalesced flag when it stores a row-sparse gradient in `.grad` (torch 2.13's AccumulateGrad rebuilds the
    tensor without it), and a re-sort of the rows on every read of the gradient (clipping, selection, the
    optimizer step) was the largest cost of a sparse step after the backward itself. O(nnz) check."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return grad._coalesced_(True)
    return grad.coalesce()


def _embedding_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def _use_triton(values: torch.Tensor, backend: str) -> bool:
    """Imports triton_lookup only when it may run: triton and torch._dynamo cost ~1.5 s at import, paid by
    every CPU process (the test suite's trainers) that would never use them."""
    if backend not in LOOKUP_BACKENDS:
        raise ConfigError(f"value_lookup: backend {backend!r} is not one of {LOOKUP_BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True  # triton_value_lookup raises a clear RuntimeError if it cannot run here
    # auto: plain CUDA tensors only; a DTensor (tensor parallel) or other subclass stays on torch's dispatch.
    if not values.is_cuda or type(values) not in (torch.Tensor, torch.nn.Parameter):
        return False
    from titan_mem.kernels import triton_lookup

    return triton_lookup.HAVE_TRITON


def value_lookup(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sum of value rows.

    values: [M, D] table; indices: [N, K] int64 rows into it; weights: [N, K] (any float dtype).
    Returns [N, D] in `out_dtype` (default values' dtype), accumulated in values' dtype or fp32; the table
    itself is never cast or copied. The table gradient is dense by default, as FSDP needs for pretraining;
    `sparse_grad=True` gives a coalesced sparse one over the unique rows touched. `backend` is one of
    LOOKUP_BACKENDS. The torch path rounds weights to values' dtype (embedding_bag needs one dtype); the
    Triton path keeps them in fp32, so bf16 results differ within bf16 rounding.
    """
    if indices.shape != weights.shape or indices.dim() != 2:
        raise ValueError(f"value_lookup: indices {tuple(indices.shape)} and weights {tuple(weights.shape)}")
    if _use_triton(values, backend):
        from titan_mem.kernels import triton_lookup

        return triton_lookup.triton_value_lookup(values, indices, weights, sparse_grad, out_dtype)
    lookup = _RowSparseLookup.apply if sparse_grad else _embedding_bag
    out = lookup(values, indices, weights)
    return out if out_dtype is None else out.to(out_dtype)
