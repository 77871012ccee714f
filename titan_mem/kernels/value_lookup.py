"""The memory value lookup behind one function, so faster kernels and sharded tables can replace it.

out[n] = sum_j weights[n, j] * values[indices[n, j]]   (a weighted bag of value rows per token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RowSparseLookup(torch.autograd.Function):
    """Lookup whose table gradient is a sparse COO tensor over the *unique* rows touched.

    Sparse finetuning needs the table gradient at a cost that scales with the rows touched: dense autograd
    would allocate [n_slots, D] and `embedding_bag(sparse=True)` one row per access (tokens x heads x k).
    Here grad_rows = S^T @ grad_out with S the [tokens, unique rows] weight matrix, so memory is O(U x D).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, indices, weights)
        return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")

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
                weights.flatten().to(grad_out.dtype),
                (uniq.numel(), n),
                check_invariants=False,
            )
            rows = torch.sparse.mm(s_t, grad_out).to(values.dtype)
            grad_values = torch.sparse_coo_tensor(
                uniq.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
            )
        if ctx.needs_input_grad[2]:
            # d out[n] / d w[n, j] = values[indices[n, j]]: one dot product per access.
            grad_weights = torch.einsum("nkd,nd->nk", values[indices].to(grad_out.dtype), grad_out)
            grad_weights = grad_weights.to(weights.dtype)
        return grad_values, None, grad_weights


def value_lookup(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = False
) -> torch.Tensor:
    """Weighted sum of value rows.

    values: [M, D] table; indices: [N, K] int64 rows into it; weights: [N, K] (any float dtype).
    Returns [N, D] in values' dtype. The default PyTorch path (`embedding_bag` with per-sample weights) gives
    a dense table gradient, as FSDP needs for pretraining; `sparse_grad=True` gives a coalesced sparse one.
    """
    if indices.shape != weights.shape or indices.dim() != 2:
        raise ValueError(f"value_lookup: indices {tuple(indices.shape)} and weights {tuple(weights.shape)}")
    if sparse_grad:
        return _RowSparseLookup.apply(values, indices, weights)
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")
