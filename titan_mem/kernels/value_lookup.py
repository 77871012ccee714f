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
    would allocate [n_slots, D] and `embedding_bag(sparse=True)` one row per access (tokens x heads x k).
    Here grad_rows = S^T @ grad_out with S the [tokens, unique rows] weight matrix, so memory is O(U x D).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, indices, weights)
        return _embedding_bag(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, weights = ctx.saved_tensors
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            n, k = indices.shape
            uniq, inverse = indices.flatten().unique(return_inverse=True)
            token = torch.arange(n, device=indices.device).repeat_interleave(k)
            s_t = torch.sparse_coo_tensor(
                torch.stack([inverse, token]),
                weights.flatten().to(values.dtype),
                (uniq.numel(), n),
                check_invariants=False,
            )
            rows = torch.sparse.mm(s_t, grad_out.to(values.dtype))
            grad_values = torch.sparse_coo_tensor(
                uniq.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
            )
        if ctx.needs_input_grad[2]:
            # d out[n] / d w[n, j] = values[indices[n, j]]: one dot product per access.
            rows_read = F.embedding(indices, values)  # [N, K, D]: the rows the forward read, no more
            grad_weights = torch.einsum("nkd,nd->nk", rows_read, grad_out.to(values.dtype))
            grad_weights = grad_weights.to(weights.dtype)
        return grad_values, None, grad_weights


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
