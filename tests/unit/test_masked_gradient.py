"""finetune.sparse_update=masked_gradient (Goyal et al. 2026, sec. 3.4): exactly torch's dense optimizer on
the zero-masked gradient, unlike the default row-sparse update (docs/design.md invariant 4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from titan_mem.parallel.value_grads import value_table_grads
from titan_mem.sparse import masked_optim
from titan_mem.sparse.masked_optim import MaskedGradientAdamW, MaskedGradientSGD
from titan_mem.sparse.update import RowSparseOptimizer

N, D = 40, 3
ADAMW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _table(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _schedule(n_steps: int, t: int = 5, dtype=torch.float64):
    """Changing selections over the even rows (odd rows never selected), one step selecting nothing."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n_steps):
        rows = torch.randperm(N // 2, generator=g)[: 0 if i == 3 else t] * 2
        out.append((rows, torch.randn(rows.numel(), D, generator=g, dtype=dtype)))
    return out


LRS = [0.1, 0.08, 0.05, 0.05, 0.03, 0.02, 0.02, 0.01]


def _torch_dense(opt_cls, start, schedule, **hyper) -> torch.Tensor:
    """torch's optimizer on the whole table, fed the zero-masked dense gradient every step."""
    p = torch.nn.Parameter(start.clone())
    opt = opt_cls([p], lr=LRS[0], foreach=False, **hyper)
    for (rows, grads), lr in zip(schedule, LRS):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.zeros_like(p)
        p.grad[rows] = grads
        opt.step()
    return p.detach()


def _run(updater, schedule) -> None:
    for (rows, grads), lr in zip(schedule, LRS):
        updater.set_lr(lr)
        updater.step(rows, grads)


@pytest.mark.parametrize("chunk", [1 << 16, 7])  # 7: the weight-decay pass crosses chunk boundaries
def test_adamw_equals_torch_adamw_on_the_masked_dense_gradient(chunk, monkeypatch):
    monkeypatch.setattr(masked_optim, "_CHUNK", chunk)
    table = _table()
    start = table.clone()
    schedule = _schedule(len(LRS))
    _run(MaskedGradientAdamW(table, lr=LRS[0], **ADAMW), schedule)
    want = _torch_dense(torch.optim.AdamW, start, schedule, **ADAMW)
    torch.testing.assert_close(table, want, rtol=1e-12, atol=1e-14)
    # never-selected (odd) rows got the weight decay alone: prod (1 - lr * wd)
    shrink = torch.prod(torch.tensor([1 - lr * 0.1 for lr in LRS], dtype=torch.float64))
    torch.testing.assert_close(table[1::2], start[1::2] * shrink, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "hyper", [dict(momentum=0.9, weight_decay=0.05), dict(momentum=0.9), dict(weight_decay=0.05)]
)
def test_sgd_equals_torch_sgd_on_the_masked_dense_gradient(hyper):
    table = _table()
    start = table.clone()
    schedule = _schedule(len(LRS))
    _run(MaskedGradientSGD(table, lr=LRS[0], **hyper), schedule)
    want = _torch_dense(torch.optim.SGD, start, schedule, **hyper)
    torch.testing.assert_close(table, want, rtol=1e-12, atol=1e-14)
    # never-selected (odd) rows move exactly when weight decay is on
    assert torch.ne(table[1::2], start[1::2]).any(dim=1).all() == bool(hyper.get("weight_decay"))


def _two_steps(sparse_update: str, optimizer: str, **hyper):
    """Step 1 selects rows 0-3, step 2 rows 4-5; the table before and after step 2 and the norm reported."""
    table = torch.nn.Parameter(_table(torch.float32))
    cfg = SimpleNamespace(name=optimizer, lr=0.1, memory_lr=None, betas=[0.9, 0.95], eps=1e-8, **hyper)
    tables = {"layers.1.feed_forward": table}
    masked = masked_optim.MASKED_UPDATERS if sparse_update == "masked_gradient" else None
    opt = RowSparseOptimizer(tables, cfg, value_table_grads(tables), masked)
    g = torch.Generator().manual_seed(2)
    for rows in (torch.arange(4), torch.tensor([4, 5])):
        before = table.detach().clone()
        grad_rows = torch.randn(rows.numel(), D, generator=g)
        table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, (N, D), check_invariants=True)
        opt.step()
    return before, table.detach().clone(), opt.last_update_norm


@pytest.mark.parametrize(
    "optimizer,hyper",
    [
        ("adamw", dict(memory_weight_decay=0.0, momentum=0.0)),
        ("sgd", dict(memory_weight_decay=0.0, momentum=0.9)),
    ],
)
def test_rows_selected_earlier_keep_moving_only_under_masked_gradient(optimizer, hyper):
    before, after, norm = _two_steps("masked_gradient", optimizer, **hyper)
    moved = torch.ne(before, after).any(dim=1)
    assert moved[:6].all()  # rows 0-3 (step 1 only) move on their momentum
    assert not moved[6:].any()  # no weight decay: never-selected rows have no state and stay put
    assert norm == pytest.approx(float((after.double() - before.double()).norm()), rel=1e-12)
    before, after, norm = _two_steps("rows", optimizer, **hyper)
    assert torch.equal(before[:4], after[:4]) and torch.equal(before[6:], after[6:])
    assert not torch.equal(before[4:6], after[4:6])


def test_update_norm_counts_every_row_the_weight_decay_moved():
    hyper = dict(memory_weight_decay=0.1, momentum=0.0)
    before, after, norm = _two_steps("masked_gradient", "adamw", **hyper)
    assert torch.ne(before, after).any(dim=1).all()  # decoupled decay shrinks every row
    assert norm == pytest.approx(float((after.double() - before.double()).norm()), rel=1e-12)
    _, _, rows_norm = _two_steps("rows", "adamw", **hyper)
    assert norm > rows_norm
    with pytest.raises(RuntimeError, match="masked_gradient"):
        cfg = SimpleNamespace(name="adamw", lr=0.1, memory_lr=None, betas=[0.9, 0.95], eps=1e-8, **hyper)
        table = torch.nn.Parameter(_table(torch.float32))
        RowSparseOptimizer(
            {"t": table}, cfg, value_table_grads({"t": table}), masked_optim.MASKED_UPDATERS
        ).changed_rows()  # no patch to take


def test_state_round_trip_keeps_the_global_step():
    schedule = _schedule(8)
    table_a = _table()
    opt_a = MaskedGradientAdamW(table_a, lr=0.05, **ADAMW)
    for rows, grads in schedule[:4]:
        opt_a.step(rows, grads)
    table_b = table_a.clone()
    opt_b = MaskedGradientAdamW(table_b, lr=1.0)
    opt_b.load_state_dict(opt_a.state_dict())
    assert int(opt_b.n_steps) == 4 and opt_b.weight_decay == 0.1
    for rows, grads in schedule[4:]:
        opt_a.step(rows, grads)
        opt_b.step(rows, grads)
    assert torch.equal(table_a, table_b)
