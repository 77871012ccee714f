"""Row-sparse SGD / AdamW: only the given rows (and their state) change, and the math matches torch."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from titan_mem.sparse.update import RowSparseAdamW, RowSparseSGD


def _table(n: int = 64, d: int = 4, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _schedule(n_steps: int, n: int = 64, d: int = 4, t: int = 12, seed: int = 1, dtype=torch.float64):
    """Per step: unique rows (unsorted, > 16 distinct in total so the state grows) and their gradients."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        rows = torch.randperm(n // 2, generator=g)[:t] * 2  # odd rows are never selected
        out.append((rows, torch.randn(t, d, generator=g, dtype=dtype)))
    return out


def test_sgd_by_hand():
    table = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    opt = RowSparseSGD(table, lr=0.5)
    opt.step(torch.tensor([2, 0]), torch.tensor([[1.0, -2.0], [4.0, 0.5]]))
    assert table.tolist() == [[-1.0, 1.75], [3.0, 4.0], [4.5, 7.0], [7.0, 8.0]]
    assert opt.n_state == 0  # plain SGD keeps no state at all

    # momentum 0.5, weight decay 0.25 (added to the gradient, as torch.optim.SGD does), lr 0.5
    table = torch.tensor([[2.0], [4.0]])
    opt = RowSparseSGD(table, lr=0.5, momentum=0.5, weight_decay=0.25)
    opt.step(torch.tensor([1]), torch.tensor([[1.0]]))
    # g = 1 + 0.25*4 = 2; b = 2; w = 4 - 0.5*2 = 3
    assert table.tolist() == [[2.0], [3.0]]
    opt.set_lr(1.0)
    opt.step(torch.tensor([1]), torch.tensor([[-1.0]]))
    # g = -1 + 0.25*3 = -0.25; b = 0.5*2 - 0.25 = 0.75; w = 3 - 1.0*0.75 = 2.25
    assert table.tolist() == [[2.0], [2.25]]
    assert opt.n_state == 1 and opt.state("momentum_buffer").tolist() == [[0.75]]


def _dense_reference(opt_cls, table, schedule, lrs, **hyper):
    """Apply torch's dense optimizer to each row alone, only on the steps where it was selected."""
    ref = table.clone()
    for r in range(table.shape[0]):
        p = torch.nn.Parameter(table[r].clone())
        opt = opt_cls([p], lr=lrs[0], foreach=False, **hyper)
        for (rows, grads), lr in zip(schedule, lrs):
            hit = (rows == r).nonzero()
            if hit.numel():
                opt.param_groups[0]["lr"] = lr
                p.grad = grads[hit[0, 0]].clone()
                opt.step()
        ref[r] = p.detach()
    return ref


def test_adamw_equals_torch_adamw_per_row():
    table = _table()
    start = table.clone()
    schedule = _schedule(8)
    lrs = [0.1 * (0.8**i) for i in range(8)]
    hyper = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = RowSparseAdamW(table, lr=lrs[0], **hyper)
    for (rows, grads), lr in zip(schedule, lrs):
        opt.set_lr(lr)
        opt.step(rows, grads)
    ref = _dense_reference(torch.optim.AdamW, start, schedule, lrs, **hyper)
    torch.testing.assert_close(table, ref, rtol=1e-13, atol=1e-15)
    assert not torch.equal(table[::2], start[::2])


def test_sgd_momentum_equals_torch_sgd_per_row():
    table = _table()
    start = table.clone()
    schedule = _schedule(6)
    lrs = [0.3, 0.3, 0.2, 0.2, 0.1, 0.1]
    opt = RowSparseSGD(table, lr=lrs[0], momentum=0.9, weight_decay=0.01)
    for (rows, grads), lr in zip(schedule, lrs):
        opt.set_lr(lr)
        opt.step(rows, grads)
    ref = _dense_reference(torch.optim.SGD, start, schedule, lrs, momentum=0.9, weight_decay=0.01)
    torch.testing.assert_close(table, ref, rtol=1e-13, atol=1e-15)


def _optimizers(table):
    return [
        RowSparseSGD(table, lr=0.5, momentum=0.9, weight_decay=0.1),
        RowSparseAdamW(table, lr=0.5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    ]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unselected_rows_and_state_stay_bit_identical(which, dtype):
    table = _table(dtype=dtype)
    start = table.clone()
    opt = _optimizers(table)[which]
    ever: set[int] = set()
    for rows, grads in _schedule(6, dtype=dtype):
        before = opt.state_dict()
        table_before = table.clone()
        opt.step(rows, grads)
        ever |= set(rows.tolist())
        # rows outside this step: values and state untouched
        keep = torch.tensor(sorted(set(range(64)) - set(rows.tolist())))
        assert torch.equal(table[keep], table_before[keep])
        after = opt.state_dict()
        old_slots = before["state_slots"]
        untouched = ~torch.isin(old_slots, rows)
        for name in opt._state_names:
            assert torch.equal(after[name][: old_slots.numel()][untouched], before[name][untouched])
        assert not torch.equal(table[rows], table_before[rows])
    never = torch.tensor(sorted(set(range(64)) - ever))
    assert never.numel() >= 32
    assert torch.equal(table[never], start[never])
    # state exists exactly for the rows ever updated
    assert opt.n_state == len(ever)
    assert sorted(opt.state_dict()["state_slots"].tolist()) == sorted(ever)
    for name in opt._state_names:
        assert opt.state(name).shape[0] == len(ever)
        if name != "row_step":
            assert opt.state(name).dtype == torch.float32  # fp32 state even for a bf16 table


def test_adam_row_step_counts_only_that_rows_updates():
    table = _table(n=8, d=2)
    opt = RowSparseAdamW(table, lr=0.1)
    grads = torch.ones(2, 2, dtype=torch.float64)
    opt.step(torch.tensor([5, 1]), grads)
    opt.step(torch.tensor([1, 6]), grads)
    opt.step(torch.tensor([1, 3]), grads[:1].expand(2, 2))
    steps = dict(zip(opt.state_dict()["state_slots"].tolist(), opt.state("row_step").tolist()))
    assert steps == {5: 1, 1: 3, 6: 1, 3: 1}


def test_state_dict_round_trip_continues_identically():
    schedule = _schedule(8)
    table_a = _table()
    opt_a = RowSparseAdamW(table_a, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)
    for rows, grads in schedule[:4]:
        opt_a.step(rows, grads)
    opt_a.set_lr(0.02)
    sd = opt_a.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    table_b = table_a.clone()
    opt_b = RowSparseAdamW(table_b, lr=1.0)  # hyper-parameters come back from the state dict
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.lr == 0.02 and opt_b.beta1 == 0.8 and opt_b.weight_decay == 0.2
    for rows, grads in schedule[4:]:
        opt_a.step(rows, grads)
        opt_b.step(rows, grads)
    assert torch.equal(table_a, table_b)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]) if isinstance(sd_a[k], torch.Tensor) else sd_a[k] == sd_b[k]

    # SGD with momentum too
    table_c = _table()
    opt_c = RowSparseSGD(table_c, lr=0.1, momentum=0.9)
    opt_c.step(*schedule[0])
    table_d = table_c.clone()
    opt_d = RowSparseSGD(table_d, lr=0.1, momentum=0.9)
    opt_d.load_state_dict(opt_c.state_dict())
    opt_c.step(*schedule[1])
    opt_d.step(*schedule[1])
    assert torch.equal(table_c, table_d)


def test_bad_steps_are_rejected():
    table = _table(n=8, d=2)
    opt = RowSparseAdamW(table, lr=0.1)
    with pytest.raises(ValueError, match="unique"):
        opt.step(torch.tensor([1, 1]), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside"):
        opt.step(torch.tensor([8]), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad_rows"):
        opt.step(torch.tensor([1]), torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="int64"):
        opt.step(torch.tensor([1.0]), torch.zeros(1, 2, dtype=torch.float64))
    opt.step(torch.empty(0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.float64))
    assert opt.n_state == 0
    with pytest.raises(ValueError, match="n_state"):
        opt.load_state_dict({**opt.state_dict(), "n_state": 3})


def test_adamw_implementations_agree():
    """fused, foreach and for-loop AdamW (optimizer.implementation) take the same steps on this CPU, and the
    switch reaches torch: auto is foreach on CPU."""
    from titan_mem.components.optim import build_optimizer
    from titan_mem.config import OptimizerConfig

    torch.manual_seed(0)
    start = torch.nn.Linear(16, 8)
    grads = [(torch.randn(8, 16), torch.randn(8)) for _ in range(5)]
    finals = {}
    for impl in ("for-loop", "foreach", "fused", "auto"):
        model = copy.deepcopy(start)
        model.value_tables = dict  # param_groups asks the model for its memory value tables: none here
        opt = build_optimizer(model, OptimizerConfig(name="adamw", implementation=impl))
        assert opt.defaults["fused"] == (impl == "fused")
        assert opt.defaults["foreach"] == (impl in ("foreach", "auto"))
        for gw, gb in grads:
            model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
            opt.step()
        finals[impl] = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    moved = (finals["for-loop"] - torch.cat([start.weight.detach().flatten(), start.bias.detach()])).abs()
    assert float(moved.min()) > 0  # every parameter took steps
    for impl in ("foreach", "fused", "auto"):
        torch.testing.assert_close(finals[impl], finals["for-loop"], rtol=0, atol=1e-6)
