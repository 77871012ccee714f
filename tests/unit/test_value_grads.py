"""The value tables' gradient paths (parallel/value_grads.py) on one process: which tables get one, and that
clipping through them equals torch's clipping of the same gradients held densely."""

from __future__ import annotations

import pytest
import torch

from titan_mem.components.optim import clip_grad_norm_
from titan_mem.parallel.value_grads import value_table_grads


def _params() -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    table, dense = torch.nn.Parameter(torch.zeros(10, 4)), torch.nn.Parameter(torch.zeros(3, 5))
    rows = torch.tensor([1, 4, 7])
    table_grad = torch.randn(3, 4, generator=g) * 3
    table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), table_grad, (10, 4))
    dense.grad = torch.randn(3, 5, generator=g)
    return table, dense, table.grad.to_dense()


def test_a_shared_pool_gets_one_path_and_a_whole_table_is_whole():
    table, other = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(4, 2))
    paths = value_table_grads({"layers.1.ff": table, "layers.3.ff": table, "layers.5.ff": other})
    assert list(paths) == ["layers.1.ff", "layers.5.ff"]
    assert all(p.layout == "whole" and p.shard is None for p in paths.values())


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e6])
def test_clipping_a_row_sparse_table_equals_torch_on_its_dense_gradient(max_norm):
    table, dense, table_dense_grad = _params()
    ref_table = torch.nn.Parameter(torch.zeros(10, 4))
    ref_dense = torch.nn.Parameter(torch.zeros(3, 5))
    ref_table.grad, ref_dense.grad = table_dense_grad.clone(), dense.grad.clone()
    paths = value_table_grads({"t": table})
    norm = clip_grad_norm_([table, dense], max_norm, paths.values())
    ref = torch.nn.utils.clip_grad_norm_([ref_table, ref_dense], max_norm if max_norm > 0 else float("inf"))
    torch.testing.assert_close(norm, ref)
    assert table.grad.is_sparse and table.grad._nnz() == 3  # scaled in place of its rows, still sparse
    torch.testing.assert_close(table.grad.to_dense(), ref_table.grad)
    torch.testing.assert_close(dense.grad, ref_dense.grad)


def test_a_row_sparse_gradient_without_a_path_is_refused():
    table, dense, _ = _params()
    with pytest.raises(RuntimeError, match="row-sparse gradient outside"):
        clip_grad_norm_([table, dense], 1.0)
