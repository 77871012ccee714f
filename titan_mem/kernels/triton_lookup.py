"""Triton kernels for the memory value lookup, with a row-sparse backward whose cost does not depend on M.

out[n] = sum_j weights[n, j] * values[indices[n, j]]        values [M, D], indices/weights [N, K]

The lookup is bandwidth-bound: it reads N*K value rows and nothing else of size D. Its backward should be too,
but dense autograd allocates and zeroes an [M, D] table gradient (M ~ 1M rows at scale) to fill N*K of its
rows. Here the backward never allocates anything of size M:

* grad_weights[n, j] = <values[indices[n, j]], grad_out[n]>: one kernel over (token, block of j) that reads
  the same N*K rows as the forward.
* the table gradient is row-sparse. The N*K flat indices are sorted once (stable, so ties keep access
  order); `unique_consecutive` gives the U distinct rows and each row's segment of accesses. One program per
  (unique row, block of D) sums weight * grad_out[token] over its segment in fp32 and writes the row once:
  no atomics, and a deterministic summation order. Cost: a sort of N*K int64 (and one host sync for U),
  N*K*D reads of grad_out, U*D writes; memory O(U*D + N*K) with U <= N*K.

`TritonValueLookup` returns that gradient as a coalesced sparse COO tensor (sparse finetuning) or scatters it
into a dense zero table, for optimizers and FSDP that need a dense gradient (that path alone costs O(M*D)).

All arithmetic is fp32 whatever the storage dtype: loads are cast to fp32 and stores cast to the output's
element type explicitly (the triton 3.9 interpreter stores zeros for a bf16 value computed without
casts). On CPU the
kernels run only under TRITON_INTERPRET=1, read when this module is imported (`INTERPRETED`).
"""

from __future__ import annotations

import torch

from titan_mem.errors import ConfigError

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the torch path in value_lookup needs nothing from here
    HAVE_TRITON = False

# Block sizes: a tile of BLOCK_K rows x BLOCK_D columns (<= 4096 elements, 32 fp32 registers a thread at 4
# warps) keeps BLOCK_K independent row loads in flight per program, which is what a bandwidth-bound gather
# needs; 256 columns of bf16 are 512 contiguous bytes a row. Not autotuned (autotuning in the interpreter
# would run every config): a starting point to tune on the GPU.
MAX_BLOCK_D = 256
TILE = 4096
NUM_WARPS = 4

if HAVE_TRITON:

    @triton.jit
    def _forward_kernel(
        values_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_v, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            rows = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0).to(tl.int64)
            w = tl.load(w_ptr + n * K + ks, mask=k_ok, other=0.0).to(tl.float32)
            ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :]
            v = tl.load(ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v * w[:, None], axis=0)
        tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _grad_weights_kernel(
        values_ptr, idx_ptr, g_ptr, gw_ptr, K, D, stride_v, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        n = tl.program_id(0).to(tl.int64)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        rows = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g = tl.load(g_ptr + n * D + cols, mask=col_ok, other=0.0).to(tl.float32)
            ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :]
            v = tl.load(ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v * g[None, :], axis=1)
        tl.store(gw_ptr + n * K + ks, acc.to(gw_ptr.dtype.element_ty), mask=k_ok)

    @triton.jit
    def _grad_rows_kernel(
        perm_ptr, offsets_ptr, w_ptr, g_ptr, out_ptr, K, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # Program u owns unique row u: its accesses are perm[offsets[u]:offsets[u + 1]] (flat n * K + j).
        u = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        start = tl.load(offsets_ptr + u)
        end = tl.load(offsets_ptr + u + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            p_ok = ps < end
            flat = tl.load(perm_ptr + ps, mask=p_ok, other=0)
            w = tl.load(w_ptr + flat, mask=p_ok, other=0.0).to(tl.float32)
            tokens = flat // K
            ptrs = g_ptr + tokens[:, None] * D + cols[None, :]
            g = tl.load(ptrs, mask=p_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g * w[:, None], axis=0)
        tl.store(out_ptr + u * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

    # The interpreter is chosen per kernel when it is decorated (import time), so ask the kernel, not the env.
    INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False


def _blocks(k: int, d: int, block_d: int | None, block_k: int | None) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): powers of two (tl.arange needs them), the tile capped at TILE elements."""
    bd = block_d or min(triton.next_power_of_2(d), MAX_BLOCK_D)
    bk = block_k or max(1, min(triton.next_power_of_2(k), TILE // bd))
    if bd & (bd - 1) or bk & (bk - 1):
        raise ValueError(f"triton lookup: block sizes must be powers of two, got block_k={bk} block_d={bd}")
    return bk, bd


def _check(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if not HAVE_TRITON:
        raise ConfigError(
            "training.memory_kernel: triton is not installed (install it or use memory_kernel=torch)"
        )
    if values.dim() != 2 or indices.dim() != 2 or indices.shape != weights.shape:
        raise ValueError(
            f"triton lookup: values {tuple(values.shape)}, indices {tuple(indices.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.int32) or not weights.is_floating_point():
        raise ValueError(f"triton lookup: indices {indices.dtype} must be int, weights {weights.dtype} float")
    if len({values.device, indices.device, weights.device}) != 1:
        raise ValueError(
            f"triton lookup: tensors on {values.device}, {indices.device}, {weights.device}; need one device"
        )
    if not values.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "triton lookup on CPU tensors runs only in the interpreter: set TRITON_INTERPRET=1 before "
            "titan_mem.kernels.triton_lookup is first imported, or use backend='torch' on CPU"
        )


def _rowmajor(values: torch.Tensor) -> torch.Tensor:
    """values with unit column stride (any row stride is passed to the kernels, so a row slice is free)."""
    return values if values.stride(1) == 1 else values.contiguous()


def lookup_forward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    block_d: int | None = None,
    block_k: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out [N, D] in `out_dtype` (default values' dtype); rows are read in the table's own dtype and weights
    in theirs, accumulated in fp32 (no bf16 rounding, no cast copy of the table)."""
    _check(values, indices, weights)
    n, k = indices.shape
    d = values.shape[1]
    out = torch.empty(n, d, dtype=out_dtype or values.dtype, device=values.device)
    if n == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    # Out-of-range rows would read arbitrary memory; this check is async on CUDA (no host sync).
    in_range = ((indices >= 0) & (indices < values.shape[0])).all()
    torch._assert_async(in_range, "value lookup: index out of range")
    values = _rowmajor(values)
    bk, bd = _blocks(k, d, block_d, block_k)
    _forward_kernel[(n, triton.cdiv(d, bd))](
        values,
        indices.contiguous(),
        weights.contiguous(),
        out,
        k,
        d,
        values.stride(0),
        BLOCK_K=bk,
        BLOCK_D=bd,
        num_warps=NUM_WARPS,
    )
    return out


def lookup_backward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    need_values: bool = True,
    need_weights: bool = True,
    *,
    block_d: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(rows [U] int64 sorted unique, grad_rows [U, D] values' dtype, grad_weights [N, K] weights' dtype).

    The table gradient is values.grad[rows] = grad_rows and zero elsewhere; rows/grad_rows are None unless
    need_values, grad_weights None unless need_weights. Nothing of size M is allocated.
    """
    _check(values, indices, weights)
    n, k = indices.shape
    d = values.shape[1]
    if grad_out.shape != (n, d):
        raise ValueError(f"triton lookup backward: grad_out {tuple(grad_out.shape)}, expected {(n, d)}")
    grad_out = grad_out.contiguous()  # any float dtype: the kernels load it as fp32
    indices = indices.contiguous()
    bk, bd = _blocks(k, d, block_d, block_k)
    rows = grad_rows = grad_weights = None
    if need_weights:
        grad_weights = torch.zeros(n, k, dtype=weights.dtype, device=weights.device)
        if n and k and d:
            values = _rowmajor(values)
            _grad_weights_kernel[(n, triton.cdiv(k, bk))](
                values,
                indices,
                grad_out,
                grad_weights,
                k,
                d,
                values.stride(0),
                BLOCK_K=bk,
                BLOCK_D=bd,
                num_warps=NUM_WARPS,
            )
    if need_values:
        flat, perm = indices.flatten().to(torch.int64).sort(stable=True)
        rows, counts = flat.unique_consecutive(return_counts=True)
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        grad_rows = torch.empty(rows.numel(), d, dtype=values.dtype, device=values.device)
        if rows.numel() and d:
            bp = bk  # accesses summed per step: the same tile shape as the forward's rows
            _grad_rows_kernel[(rows.numel(), triton.cdiv(d, bd))](
                perm,
                offsets,
                weights.contiguous().flatten(),
                grad_out,
                grad_rows,
                k,
                d,
                BLOCK_P=bp,
                BLOCK_D=bd,
                num_warps=NUM_WARPS,
            )
    return rows, grad_rows, grad_weights


class TritonValueLookup(torch.autograd.Function):
    """Kernel forward and backward; the table gradient is sparse COO (coalesced, U rows) or dense.

    Use through `triton_value_lookup` (or `value_lookup(..., backend="triton")`), which keeps it out of
    torch.compile graphs.
    """

    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool = False, out_dtype=None):
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse_grad = sparse_grad
        return lookup_forward(values, indices, weights, out_dtype=out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_values, _, need_weights, _, _ = ctx.needs_input_grad
        rows, grad_rows, grad_weights = lookup_backward(
            values, indices, weights, grad_out, need_values, need_weights
        )
        grad_values = None
        if need_values:
            if ctx.sparse_grad:
                grad_values = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), grad_rows, values.shape, is_coalesced=True, check_invariants=False
                )
            else:  # rows are unique, so a plain (non-accumulating) index_put fills them
                grad_values = torch.zeros_like(values).index_put_((rows,), grad_rows)
        return grad_values, None, grad_weights, None, None


@torch.compiler.disable
def triton_value_lookup(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable Triton lookup, result in `out_dtype` (default values'). Kept out of torch.compile: the
    backward's unique row count is data-dependent, and the kernels are already what a compiler would
    generate for a gather."""
    _check(values, indices, weights)
    return TritonValueLookup.apply(values, indices, weights, sparse_grad, out_dtype)
