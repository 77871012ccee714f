"""Lazy row-sparse AdamW (components/lazy_adamw.py): dense AdamW when every row is read, untouched rows and
their moments frozen otherwise, per-row bias correction, checkpoint round trip, and the trainer end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_model_tensors, losses, run_tool, run_trainer
from conftest import ok as _ok

from titan_mem.components.lazy_adamw import LazyRowAdamW
from titan_mem.config import parse_args
from titan_mem.errors import ConfigError

HYPER = {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-8}


def _sparse(rows: list[int], grads: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), grads, shape, check_invariants=True)


def _params(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.Parameter(torch.randn(8, 3, generator=g)),  # the value table
        torch.nn.Parameter(torch.randn(5, generator=g)),  # any other parameter
    )


def _groups(table, other, wd: float = 0.1) -> list[dict]:
    return [{"params": [other], "weight_decay": 0.05}, {"params": [table], "weight_decay": wd}]


def test_equals_dense_adamw_when_every_row_is_read_every_step():
    ours_t, ours_o = _params()
    ref_t, ref_o = _params()
    ours = LazyRowAdamW(_groups(ours_t, ours_o), [ours_t], **HYPER)
    ref = torch.optim.AdamW(_groups(ref_t, ref_o), **HYPER, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        gt, go = torch.randn(8, 3, generator=g), torch.randn(5, generator=g)
        rows = torch.randperm(8, generator=g).tolist()  # unsorted, duplicates split in two entries
        ours_t.grad = _sparse(rows + rows[:2], torch.cat([gt[rows], torch.zeros(2, 3)]), (8, 3))
        ours_o.grad, ref_t.grad, ref_o.grad = go.clone(), gt.clone(), go.clone()
        ours.step()
        ref.step()
        assert ours_t.grad.is_sparse  # the caller's gradient is handed back
    torch.testing.assert_close(ours_t.data, ref_t.data, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours_o.data, ref_o.data)  # the dense parameter went through AdamW itself
    torch.testing.assert_close(ours.state[ours_t]["exp_avg_sq"], ref.state[ref_t]["exp_avg_sq"])
    assert ours.state[ours_t]["row_step"].tolist() == [4.0] * 8


def test_unread_rows_and_their_moments_do_not_move_and_each_row_counts_its_own_steps():
    table, other = _params()
    start = table.detach().clone()
    opt = LazyRowAdamW(_groups(table, other), [table], **HYPER)
    single = torch.nn.Parameter(start[2:3].clone())  # row 2 alone under dense AdamW
    ref = torch.optim.AdamW([single], weight_decay=0.1, **HYPER, foreach=False)
    g = torch.Generator().manual_seed(2)
    for rows in ([2, 5], [5], [2], [2, 5]):  # row 2 read at steps 1, 3, 4; rows 0,1,3,4,6,7 never
        grads = torch.randn(len(rows), 3, generator=g)
        table.grad = _sparse(rows, grads, (8, 3))
        opt.step()
        if 2 in rows:
            single.grad = grads[rows.index(2)].unsqueeze(0)
            ref.step()
    never = [0, 1, 3, 4, 6, 7]
    assert torch.equal(table.data[never], start[never])
    assert not opt.state[table]["exp_avg"][never].any() and not opt.state[table]["exp_avg_sq"][never].any()
    assert opt.state[table]["row_step"].tolist() == [0, 0, 3, 0, 0, 3, 0, 0]
    torch.testing.assert_close(table.data[2:3], single.data, rtol=1e-6, atol=1e-7)
    assert other.grad is None and torch.equal(other.data, _params()[1].data)  # no gradient: untouched


def test_state_dict_round_trip_continues_exactly_and_lr_zero_init_changes_nothing():
    def run(steps: range, opt_state=None, table_data=None):
        table, other = _params()
        if table_data is not None:
            table.data.copy_(table_data)
        opt = LazyRowAdamW(_groups(table, other), [table], **HYPER)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for s in steps:
            g = torch.Generator().manual_seed(10 + s)
            rows = torch.randperm(8, generator=g)[:3].tolist()
            table.grad = _sparse(rows, torch.randn(3, 3, generator=g), (8, 3))
            opt.step()
        return table, opt

    straight, _ = run(range(6))
    half, opt = run(range(3))
    saved = opt.state_dict()
    assert saved["state"][1]["row_step"].dtype == torch.float32
    resumed, _ = run(range(3, 6), saved, half.data)
    assert torch.equal(straight.data, resumed.data)

    # DCP initialises missing optimizer state with a dense zero gradient at lr 0 before loading into it.
    table, other = _params()
    before = table.detach().clone()
    opt = LazyRowAdamW(_groups(table, other), [table], **{**HYPER, "lr": 0.0})
    table.grad, other.grad = torch.zeros_like(table), torch.zeros_like(other)
    opt.step()
    assert torch.equal(table.data, before)


def test_refuses_what_it_cannot_run():
    table, other = _params()
    with pytest.raises(ValueError, match="not in any parameter group"):
        LazyRowAdamW([other], [table], **HYPER)
    with pytest.raises(ValueError, match="amsgrad"):
        LazyRowAdamW([table], [table], amsgrad=True, **HYPER)
    dense_state = torch.optim.AdamW([table], **HYPER)
    table.grad = torch.ones_like(table)
    dense_state.step()
    opt = LazyRowAdamW([table], [table], **HYPER)
    opt.load_state_dict(dense_state.state_dict())
    table.grad = _sparse([1], torch.ones(1, 3), (8, 3))
    with pytest.raises(ValueError, match="saved by dense AdamW"):
        opt.step()


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer.name=sgd"],
        ["--parallelism.memory_parallel_degree=0"],
        ["--training.mode=lora_finetune", "--checkpoint.initial_load_path=x"],
    ],
)
def test_config_refuses_lazy_rows_where_no_row_sparse_adamw_runs(extra):
    with pytest.raises(ConfigError, match="optimizer.memory_update: 'lazy' needs"):
        parse_args(["train_configs/debug_model.toml", "--optimizer.memory_update=lazy", *extra])


VALUES = "layers.1.feed_forward.values.weight"  # the tiny model's memory value table


def test_lazy_pretraining_resumes_exactly_and_leaves_rows_never_read_alone(tiny, tmp_path):
    """The trainer with optimizer.memory_update=lazy: 2 + 2 steps resumed = 4 straight, bit for bit (table,
    row steps, moments, schedule). Against dense AdamW from the same seed, the tables differ in the rows
    read and agree in the rest (rows no step read keep their initial values under both)."""
    lazy = [*tiny, "--optimizer.memory_update=lazy", "--lr_scheduler.decay_type=constant"]
    straight, split, dense = tmp_path / "straight", tmp_path / "split", tmp_path / "dense"
    _ok(run_trainer([*lazy, f"--job.dump_folder={straight}", "--training.steps=4"]))
    _ok(run_trainer([*lazy, f"--job.dump_folder={split}", "--training.steps=2"]))
    assert (
        "resumed from" in _ok(run_trainer([*lazy, f"--job.dump_folder={split}", "--training.steps=4"])).stdout
    )
    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    t_straight = load_model_tensors(straight / "checkpoints" / "step-4")
    t_split = load_model_tensors(split / "checkpoints" / "step-4")
    assert all(torch.equal(t_straight[k], t_split[k]) for k in t_straight)

    dense_args = [*tiny, "--lr_scheduler.decay_type=constant", f"--job.dump_folder={dense}"]
    _ok(run_trainer([*dense_args, "--training.steps=4"]))
    t_dense = load_model_tensors(dense / "checkpoints" / "step-4")
    moved_lazy = torch.ne(t_straight[VALUES], t_dense[VALUES]).any(dim=1)
    assert 0 < int(moved_lazy.sum()) < moved_lazy.numel()


def test_bench_reports_both_optimizers_per_fraction(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--skip-loss", "--table", "512x8", "--fractions", "0.1,1", "--repeat", "1", "--out", str(out)]
    _ok(run_tool("bench_lazy_adamw.py", args))
    results = json.loads(out.read_text())["optimizer_step"]["results"]
    assert [r["fraction_read"] for r in results] == [0.1, 1.0]
    assert all(r["dense_adamw_s"] > 0 and r["lazy_adamw_s"] > 0 for r in results)
