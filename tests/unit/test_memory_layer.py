"""Product-key memory: exact search (invariant 1), lookup correctness, sparse gradients, index recording."""

import dataclasses

import pytest
import torch

from titan_mem.kernels import coalesced, restrict_row_grads, value_lookup
from titan_mem.models.args import FLAVORS, MemoryArgs
from titan_mem.models.memory import MemoryLayer, QueryBatchNorm, product_key_topk
from titan_mem.models.stats import param_counts
from titan_mem.models.transformer import Transformer


@pytest.mark.parametrize(
    "n,heads,n_keys,half,topk",
    [(7, 1, 16, 4, 4), (32, 4, 32, 8, 8), (5, 2, 64, 16, 32), (3, 3, 10, 2, 10)],
)
def test_product_key_topk_equals_brute_force(n, heads, n_keys, half, topk):
    g = torch.Generator().manual_seed(n * 1000 + n_keys)
    query = torch.randn(n, heads, 2 * half, generator=g, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, half, generator=g, dtype=torch.float64)
    scores, slots = product_key_topk(query, keys, topk)
    # Brute force: score of slot (i, j) = q1 . k1_i + q2 . k2_j over all n_keys**2 slots.
    s1 = torch.einsum("nhd,hkd->nhk", query[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", query[..., half:], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # slot = i * n_keys + j
    ref_scores, ref_slots = full.topk(topk, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(slots.sort(-1).values, ref_slots.sort(-1).values)
    assert int(slots.max()) < n_keys * n_keys


def test_value_lookup_matches_naive_sum_and_grads_touch_only_used_rows():
    torch.manual_seed(0)
    values = torch.randn(50, 6, requires_grad=True)
    idx = torch.randint(0, 50, (4, 5))
    w = torch.rand(4, 5)
    out = value_lookup(values, idx, w)
    ref = (values[idx] * w.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[idx.flatten()] = True
    assert values.grad[~touched].abs().sum() == 0
    assert (values.grad[touched].abs().sum(1) > 0).all()
    with pytest.raises(ValueError):
        value_lookup(values, idx, w[:, :3])


def _layer(plus=True, query_norm="rms", v_dim=16):
    args = MemoryArgs(
        layers=[0], n_keys=8, heads=2, topk=3, k_dim=8, v_dim=v_dim, plus=plus, query_norm=query_norm
    )
    layer = MemoryLayer(16, args, v_dim)
    torch.manual_seed(0)
    layer.init_weights()
    return layer


@pytest.mark.parametrize("plus,query_norm", [(True, "rms"), (False, "none"), (True, "batchnorm")])
def test_memory_layer_output_is_weighted_bag_of_selected_rows(plus, query_norm):
    layer = _layer(plus, query_norm)
    layer.eval()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert out.shape == x.shape
    weights, slots = layer.lookup_slots(x.reshape(-1, 16))
    assert torch.allclose(weights.sum(-1), torch.ones(10, 2))
    bag = (layer.value_table.weight[slots] * weights.unsqueeze(-1)).sum((1, 2))
    expected = (
        layer.value_proj(bag * torch.nn.functional.silu(layer.gate_proj(x.reshape(-1, 16)))) if plus else bag
    )
    torch.testing.assert_close(out.reshape(-1, 16), expected, rtol=1e-5, atol=1e-6)


def test_slots_returned_only_when_asked():
    layer = _layer()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert isinstance(out, torch.Tensor)
    out_too, slots = layer(x, return_slots=True)
    assert torch.equal(out_too, out)
    assert slots.shape == (2, 5, 2, 3) and slots.dtype == torch.int64
    assert slots.max() < 64 and not slots.requires_grad
    _, want = layer.lookup_slots(x.reshape(-1, 16))
    assert torch.equal(slots.reshape(-1, 2, 3), want)


def test_memory_value_gradient_is_row_sparse():
    layer = _layer()
    x = torch.randn(1, 3, 16)
    out, slots = layer(x, return_slots=True)
    out.pow(2).sum().backward()
    grad = layer.value_table.weight.grad
    touched = torch.zeros(64, dtype=torch.bool)
    touched[slots.flatten()] = True
    assert grad[~touched].abs().sum() == 0
    assert grad[touched].abs().sum() > 0


def test_shared_value_pool_is_one_parameter_counted_once():
    base = FLAVORS["debug"]
    args = dataclasses.replace(
        base, vocab_size=256, memory=dataclasses.replace(base.memory, layers=[1, 2], shared_values=True)
    )
    model = Transformer(args)
    model.init_weights()
    mems = list(model.memory_layers().values())
    assert len(mems) == 2 and mems[0].value_table.weight is mems[1].value_table.weight
    assert sum(p.numel() for p in model.parameters()) == param_counts(args).total
    out = model(torch.randint(0, 256, (2, 8)))
    out.sum().backward()
    assert model.shared_memory_values.weight.grad is not None


@pytest.mark.parametrize("flavor", ["debug", "debug_dense"])
@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_match_module(flavor, tie):
    args = dataclasses.replace(FLAVORS[flavor], vocab_size=384, tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_counts(args).total


def test_model_init_is_seeded_and_causal():
    args = dataclasses.replace(FLAVORS["debug"], vocab_size=256)
    torch.manual_seed(1)
    a = Transformer(args)
    a.init_weights()
    torch.manual_seed(1)
    b = Transformer(args)
    b.init_weights()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    tokens = torch.randint(0, 256, (1, 12))
    a.eval()
    full = a(tokens)
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    # Positions before the change must not see it (causal attention, per-token memory lookup).
    torch.testing.assert_close(a(changed)[0, :8], full[0, :8])


@pytest.mark.parametrize("rows", [40, 6])  # some rows untouched; every row touched (its own path)
def test_sparse_grad_lookup_matches_dense_and_keeps_only_touched_rows(rows):
    torch.manual_seed(3)
    values = torch.randn(rows, 5, requires_grad=True)
    idx = torch.randint(0, rows, (6, 4))
    w = torch.rand(6, 4, requires_grad=True)
    g = torch.randn(6, 5)
    (value_lookup(values, idx, w) * g).sum().backward()
    dense_values, dense_w = values.grad.clone(), w.grad.clone()
    values.grad = w.grad = None
    (value_lookup(values, idx, w, sparse_grad=True) * g).sum().backward()
    assert values.grad.is_sparse
    assert values.grad._nnz() == idx.unique().numel()  # one row per unique slot, not per access
    torch.testing.assert_close(values.grad.to_dense(), dense_values)
    torch.testing.assert_close(w.grad, dense_w)
    assert (idx.unique().numel() == rows) == (rows == 6)


def test_coalesced_trusts_sorted_rows_and_sorts_the_rest():
    """Autograd stores a row-sparse gradient without its coalesced flag: `coalesced` restores the flag when
    the rows are sorted and unique (no re-sort), and coalesces a truly uncoalesced one (accumulated)."""
    values = torch.randn(30, 3, requires_grad=True)
    idx, w = torch.tensor([[4, 9], [9, 2]]), torch.rand(2, 2)
    value_lookup(values, idx, w, sparse_grad=True).sum().backward()
    once = values.grad.to_dense()
    assert not values.grad.is_coalesced()  # what torch hands back; if this changes, `coalesced` can go
    got = coalesced(values.grad)
    assert got.is_coalesced() and got._indices()[0].tolist() == [2, 4, 9]
    torch.testing.assert_close(got.to_dense(), once)
    value_lookup(values, idx.flip(1), w, sparse_grad=True).sum().backward()  # accumulated: rows repeat
    summed = coalesced(values.grad)
    assert summed._indices()[0].tolist() == [2, 4, 9]
    torch.testing.assert_close(summed.to_dense(), values.grad.to_dense())


def _bn_pair(channels: int) -> tuple[torch.nn.BatchNorm1d, QueryBatchNorm]:
    """A reference BatchNorm1d and a QueryBatchNorm with the same non-trivial affine parameters."""
    ref, ours = torch.nn.BatchNorm1d(channels), QueryBatchNorm(channels)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(channels, generator=g))
        ref.bias.copy_(0.3 * torch.randn(channels, generator=g))
    ours.load_state_dict(ref.state_dict())  # same names: a BatchNorm1d checkpoint loads as is
    return ref, ours


def test_query_batchnorm_matches_batchnorm1d_on_one_process():
    ref, ours = _bn_pair(6)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # several steps: the running stats (and the shift taken from them) evolve
        x = (torch.randn(40, 6, generator=g) * 2 + 0.5 * step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(40, 6, generator=g)
        y, y_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-5
            )
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ours.eval(), ref.eval()
    x = torch.randn(5, 6, generator=g)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_query_batchnorm_init_resets_like_batchnorm1d():
    layer = _layer(query_norm="batchnorm")
    norm = layer.query_norm
    assert isinstance(norm, QueryBatchNorm) and isinstance(norm, torch.nn.BatchNorm1d)
    layer.train()
    layer(torch.randn(3, 4, 16))
    assert int(norm.num_batches_tracked) == 1 and not torch.equal(norm.running_var, torch.ones(16))
    layer.init_weights()
    assert torch.equal(norm.running_mean, torch.zeros(16)) and torch.equal(norm.running_var, torch.ones(16))
    assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.bias, torch.zeros(16))
    assert int(norm.num_batches_tracked) == 0


def test_restricted_row_grads_are_the_dense_gradient_at_the_kept_rows():
    """`restrict_row_grads`: the row-sparse backward computes the kept rows only (those a sparse finetune
    will update), each equal to the dense gradient's row; the weights' gradient is untouched; cleared, every
    row read comes back."""
    torch.manual_seed(4)
    values = torch.nn.Parameter(torch.randn(50, 6))
    idx, w, g = torch.randint(0, 50, (12, 4)), torch.rand(12, 4, requires_grad=True), torch.randn(12, 6)
    (value_lookup(values, idx, w) * g).sum().backward()
    dense_values, dense_w = values.grad.clone(), w.grad.clone()
    read = idx.unique()
    unread = [r for r in range(50) if r not in set(read.tolist())]
    keep = torch.cat([read[::2], torch.tensor(unread[:1])])  # and a row not read
    for rows, expect in [(keep, read[::2]), (None, read)]:
        values.grad = w.grad = None
        restrict_row_grads(values, rows)
        (value_lookup(values, idx, w, sparse_grad=True) * g).sum().backward()
        grad = coalesced(values.grad)
        assert torch.equal(grad.indices()[0], expect)
        torch.testing.assert_close(grad.values(), dense_values[expect])
        torch.testing.assert_close(w.grad, dense_w)
    assert not hasattr(values, "grad_rows_only")
