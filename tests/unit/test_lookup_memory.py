"""A value lookup never casts, copies or allocates anything table-sized unless a dense gradient is asked for.

The default layout on one GPU is a 1 x 1 column shard of an fp32 table read in bf16 compute
(`ColumnShardedValues.compute_dtype`); casting the table per micro-batch would cost M x D x 2 bytes every time
(2 GiB at the 1B shapes). Allocations are counted with the profiler (components.bench.allocations), which
sees CPU tensors too, so this runs on CPU for both the torch and the Triton (interpreter) path.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from titan_mem.components.bench import allocations
from titan_mem.kernels import value_lookup
from titan_mem.models.memory import MemoryValues
from titan_mem.parallel.memory_parallel import ColumnShardedValues, memory_parallel_mesh

M, D, N, K = 16384, 64, 64, 8  # table 4 MiB in fp32; a batch reads N * K = 512 rows (128 KiB)


@pytest.fixture(scope="module")
def one_rank_group():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _split_table(seed: int = 0) -> ColumnShardedValues:
    torch.manual_seed(seed)
    values = MemoryValues(M, D)
    values.init_weights()
    return ColumnShardedValues(values, memory_parallel_mesh("cpu", 1, -1), compute_dtype=torch.bfloat16)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, M, (N, K), generator=g)
    w = torch.softmax(torch.randn(N, K, generator=g), -1).requires_grad_()
    up = torch.randn(N, D, generator=g).to(torch.bfloat16)
    return idx, w, up


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_lookup_in_bf16_allocates_nothing_table_sized(one_rank_group, backend):
    values = _split_table()
    values.backend = backend
    idx, w, up = _batch()

    def step():
        out = values.lookup(idx, w, sparse_grad=True)
        assert out.dtype == torch.bfloat16
        (out.float() * up.float()).sum().backward()

    used = allocations(step)
    table_bf16 = M * D * 2
    assert used["largest_bytes"] < table_bf16 // 4, used
    assert used["total_bytes"] < table_bf16, used
    grad = values.weight.grad
    assert grad.is_sparse and grad.dtype == torch.float32
    assert grad.coalesce().indices().shape[1] == idx.unique().numel()

    # Numerics: the fp32 rows' bag, rounded once to bf16 (no bf16 rounding of the table first).
    ref = value_lookup(values.weight.detach(), idx, w.detach(), backend="torch").to(torch.bfloat16)
    torch.testing.assert_close(values.lookup(idx, w.detach(), False).float(), ref.float(), rtol=0, atol=0.02)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_gradient_is_the_only_table_sized_allocation(one_rank_group, backend):
    values = _split_table()
    values.backend = backend
    idx, w, up = _batch()

    def step():
        (values.lookup(idx, w, sparse_grad=False).float() * up.float()).sum().backward()

    used = allocations(step)
    # The optimizer asked for a dense fp32 gradient: that one [M, D] fp32 buffer (plus kernels' small
    # scratch) is allowed; a bf16 copy of the table (M * D * 2 bytes) is not.
    assert used["total_bytes"] < M * D * 4 + M * D, used
    assert values.weight.grad.dtype == torch.float32 and not values.weight.grad.is_sparse
