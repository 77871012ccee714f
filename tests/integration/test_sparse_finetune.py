"""Sparse memory finetuning end to end (invariant 4), its ranking edge cases, the baselines, and counting."""

import json

import pytest
import torch
from conftest import TINY, load_model_tensors, read_metrics, run_tool, run_trainer, sparse_finetune_args
from conftest import ok as _ok

from titan_mem.kernels import coalesced
from titan_mem.parallel.value_grads import value_table_grads
from titan_mem.sparse.counts import load_background_counts
from titan_mem.sparse.select import selected_row_gradients

VALUES = "layers.1.feed_forward.values.weight"  # the tiny model's memory value table


@pytest.fixture
def base(pretrained):
    """The shared tiny pretraining checkpoint (with its background counts)."""
    return pretrained


def _finetune(base, tmp_path, *extra, name="ft"):
    run = tmp_path / name
    _ok(run_trainer(sparse_finetune_args(base, run, *extra)))
    return run


def _selections(run):
    lines = [json.loads(x) for x in (run / "selected_slots.jsonl").read_text().splitlines()]
    return [torch.tensor(rec["selected"]["layers.1.feed_forward"], dtype=torch.long) for rec in lines]


def _changed_rows(a, b):
    return torch.nonzero(torch.ne(a, b).any(dim=1)).flatten()


def _assert_only_selected_rows_changed(base, run, top_t):
    before = load_model_tensors(base)
    after = load_model_tensors(run / "checkpoints" / "step-4")
    assert before.keys() == after.keys()
    for key in before:
        if key != VALUES:
            assert torch.equal(before[key], after[key]), f"{key} changed"
    selections = _selections(run)
    assert len(selections) == 4
    assert all(len(s) <= top_t for s in selections)
    ever_selected = set(torch.cat(selections).tolist())
    changed = set(_changed_rows(before[VALUES], after[VALUES]).tolist())
    assert changed, "sparse finetuning changed nothing"
    assert changed <= ever_selected
    return changed, ever_selected


SGD = ["--optimizer.name=sgd", "--optimizer.lr=2"]
# AdamW with momentum and decoupled weight decay: the update, not only the gradient, must be masked.
ADAMW_WD = ["--optimizer.name=adamw", "--optimizer.lr=0.01", "--optimizer.memory_weight_decay=0.1"]
SGD_MOMENTUM_WD = [
    "--optimizer.name=sgd",
    "--optimizer.lr=1",
    "--optimizer.momentum=0.9",
    "--optimizer.memory_weight_decay=0.1",
]


@pytest.mark.parametrize(
    "ranking,optimizer",
    [("tfidf", SGD), ("tfidf", ADAMW_WD), ("tfidf", SGD_MOMENTUM_WD), ("kl", SGD), ("tf", SGD)],
    ids=["tfidf-sgd", "tfidf-adamw_wd", "tfidf-sgd_momentum_wd", "kl-sgd", "tf-sgd"],
)
def test_sparse_finetune_changes_only_selected_rows(base, tmp_path, optimizer, ranking):
    run = _finetune(base, tmp_path, *optimizer, f"--finetune.ranking={ranking}")
    _assert_only_selected_rows_changed(base, run, top_t=10)
    records = read_metrics(run)
    assert all(r["slots_selected"] <= 10 and 0 < r["frac_touched_kept"] <= 1 for r in records)
    assert all(r["update_norm"] > 0 for r in records)


def test_ranking_all_updates_every_touched_row_whatever_top_t(base, tmp_path):
    """The all-indices ablation: top_t=1 cuts nothing, every touched row changes and no other one."""
    run = _finetune(base, tmp_path, "--finetune.ranking=all", "--finetune.top_t=1")
    changed, ever_selected = _assert_only_selected_rows_changed(base, run, top_t=100000)
    records = read_metrics(run)
    assert all(r["slots_selected"] == r["slots_touched"] > 1 for r in records)
    logged = [json.loads(x) for x in (run / "selected_slots.jsonl").read_text().splitlines()]
    assert [len(r["selected"]["layers.1.feed_forward"]) for r in logged] == [
        r["slots_touched"] for r in logged
    ]
    assert changed == ever_selected


def test_masked_gradient_adamw_moves_rows_outside_the_selection(base, tmp_path):
    """The papers' update (Goyal et al. 2026, sec. 3.4): AdamW momentum keeps moving rows selected earlier,
    decoupled weight decay shrinks the rows never selected, and the checkpoint holds the whole model."""
    masked = ["--finetune.sparse_update=masked_gradient", "--checkpoint.interval=1", *ADAMW_WD]
    run = _finetune(base, tmp_path, *masked)
    step3, step4 = (run / "checkpoints" / f"step-{s}" for s in (3, 4))
    assert not (step4 / "patch.safetensors").exists()  # save_format=auto: the whole model
    before, at3, at4 = load_model_tensors(base), load_model_tensors(step3), load_model_tensors(step4)
    assert all(torch.equal(before[k], at4[k]) for k in before if k != VALUES)
    selections = _selections(run)
    last, earlier = set(selections[-1].tolist()), set(torch.cat(selections[:-1]).tolist())
    moved_last_step = set(_changed_rows(at3[VALUES], at4[VALUES]).tolist())
    assert moved_last_step - last, "no row outside the last step's selection moved"
    never = torch.tensor(sorted(set(range(before[VALUES].shape[0])) - last - earlier))
    assert never.numel() > 0
    shrink = (1 - 0.01 * 0.1) ** 4  # constant lr 0.01, memory_weight_decay 0.1, 4 steps
    torch.testing.assert_close(at4[VALUES][never], before[VALUES][never] * shrink, rtol=1e-6, atol=0)
    momentum_only = torch.tensor(sorted(earlier - last))  # beyond the decay: their Adam step
    beyond = torch.ne(at4[VALUES][momentum_only], at3[VALUES][momentum_only] * (1 - 0.01 * 0.1)).any(dim=1)
    assert bool(beyond.all())
    assert all(r["update_norm"] > 0 for r in read_metrics(run))


def test_top_t_zero_changes_nothing(base, tmp_path):
    run = _finetune(base, tmp_path, "--finetune.top_t=0")
    before, after = load_model_tensors(base), load_model_tensors(run / "checkpoints" / "step-4")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("degree", [-1, 0, 1], ids=["columns", "whole", "column_replicas"])
def test_sparse_finetune_two_ranks_equals_one_rank(base, tmp_path, degree):
    """Slot counts are all-reduced: 2 ranks select the same rows and reach the same values as 1 rank, with
    every layout's sum of the selected rows' gradient (parallel.value_grads): none inside one column group
    of 2, over both ranks for a whole table, over the 2 replicas of 1-rank column groups."""
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"r{nproc}"
        args = sparse_finetune_args(
            base, run, "--training.micro_batch_size=2", "--training.steps=3",
            f"--parallelism.memory_parallel_degree={degree if nproc == 2 else -1}",
        )  # fmt: skip
        _ok(run_trainer(args, nproc=nproc))
        runs[nproc] = run
    sel1, sel2 = _selections(runs[1]), _selections(runs[2])
    assert all(torch.equal(a, b) for a, b in zip(sel1, sel2))
    v1 = load_model_tensors(runs[1] / "checkpoints" / "step-3")[VALUES]
    v2 = load_model_tensors(runs[2] / "checkpoints" / "step-3")[VALUES]
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)


SHAPE = ["--batch-size", "4", "--seq-len", "32"]  # the fine-tuning batch of sparse_finetune_args


def test_background_counts_two_ranks_equal_one_rank(base, tmp_path):
    args = [*TINY, f"--job.dump_folder={tmp_path}", f"--checkpoint.initial_load_path={base}"]
    files = {}
    for nproc in (1, 2):
        out = tmp_path / f"counts{nproc}.safetensors"
        _ok(
            run_tool(
                "background_counts.py",
                ["train_configs/debug_model.toml", *args, *SHAPE, "--batches", "5", "--out", str(out)],
                nproc=nproc,
            )
        )
        files[nproc] = load_background_counts(out)
    one, two = files[1], files[2]
    assert one.layers == two.layers == ["layers.1.feed_forward"]
    for layer in one.layers:
        assert torch.equal(one.df[layer], two.df[layer])
        assert torch.equal(one.total[layer], two.total[layer])
        assert int(one.df[layer].max()) <= 5
        # 5 batches x 4 sequences x 32 tokens x 2 heads x top-4 reads
        assert int(one.total[layer].sum()) == 5 * 4 * 32 * 2 * 4
    meta = one.metadata
    assert meta["n_batches"] == 5 and meta["batch_size"] == 4 and meta["seq_len"] == 32
    assert meta["checkpoint_step"] == 3 and meta["n_slots"] == {"layers.1.feed_forward": 256}


def test_background_counts_batch_size_is_exact(base, tmp_path):
    """Exactly --batch-size sequences per batch: a whole number of micro-batches, else a one-line refusal."""
    args = ["train_configs/debug_model.toml", *TINY, f"--job.dump_folder={tmp_path}"]
    args += [f"--checkpoint.initial_load_path={base}", "--batches", "3", "--seq-len", "32"]
    refused = tmp_path / "refused.safetensors"
    proc = run_tool("background_counts.py", [*args, "--batch-size", "3", "--out", str(refused)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: --batch-size: 3 is not a multiple of training.micro_batch_size 2" in proc.stderr
    assert not refused.exists()
    out = tmp_path / "counts.safetensors"
    _ok(run_tool("background_counts.py", [*args, "--batch-size", "6", "--out", str(out)]))  # 3 x 2 rows
    counts = load_background_counts(out)
    assert counts.metadata["batch_size"] == 6
    # 3 batches x 6 sequences x 32 tokens x 2 heads x top-4 reads
    assert int(counts.total["layers.1.feed_forward"].sum()) == 3 * 6 * 32 * 2 * 4


def test_bad_background_counts_file(base, tmp_path):
    missing = tmp_path / "nope.safetensors"
    proc = run_trainer(
        [
            *TINY,
            f"--job.dump_folder={tmp_path / 'x'}",
            "--training.mode=sparse_finetune",
            f"--checkpoint.initial_load_path={base}",
            f"--finetune.background_counts={missing}",
            "--data.regime=facts",
            "--training.steps=1",
        ]
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 20)
    proc = run_trainer(
        [
            *TINY,
            f"--job.dump_folder={tmp_path / 'y'}",
            "--training.mode=sparse_finetune",
            f"--checkpoint.initial_load_path={base}",
            f"--finetune.background_counts={corrupt}",
            "--data.regime=facts",
            "--training.steps=1",
        ]
    )
    assert proc.returncode == 2 and str(corrupt) in proc.stderr and "Traceback" not in proc.stderr


def test_full_and_lora_finetune_from_the_same_checkpoint(base, tmp_path):
    common = [
        *TINY,
        f"--checkpoint.initial_load_path={base}",
        "--data.regime=facts",
        "--training.micro_batch_size=4",
        "--training.global_batch_size=4",
        "--training.steps=2",
    ]
    full = tmp_path / "full"
    _ok(run_trainer([*common, f"--job.dump_folder={full}", "--training.mode=full_finetune"]))
    lora = tmp_path / "lora"
    _ok(
        run_trainer(
            [
                *common,
                f"--job.dump_folder={lora}",
                "--training.mode=lora_finetune",
                "--finetune.lora_rank=2",
                "--optimizer.lr=0.01",
            ]
        )
    )
    before = load_model_tensors(base)
    after_full = load_model_tensors(full / "checkpoints" / "step-2")
    assert any(not torch.equal(before[k], after_full[k]) for k in before if k != VALUES)
    after_lora = load_model_tensors(lora / "checkpoints" / "step-2")
    adapters = [k for k in after_lora if k.endswith((".lora_a", ".lora_b"))]
    assert adapters and set(after_lora) - set(adapters) == set(before)
    for key in before:  # LoRA leaves every base weight untouched
        assert torch.equal(before[key], after_lora[key]), key
    assert any(k.endswith(".lora_b") and after_lora[k].abs().sum() > 0 for k in adapters)


def test_sparse_finetune_resume_is_exact_with_row_adamw_state(base, tmp_path):
    """The row-sparse optimizer state and the data position go into the checkpoint: 2+2 steps = 4 steps."""
    extra = ["--optimizer.name=adamw", "--optimizer.lr=0.01", "--optimizer.memory_weight_decay=0.1"]
    straight = _finetune(base, tmp_path, *extra, name="straight")
    split = tmp_path / "split"
    args = sparse_finetune_args(base, split, *extra)
    _ok(run_trainer([*args, "--training.steps=2"]))
    proc = _ok(run_trainer([*args, "--training.steps=4"]))
    assert "resumed from" in proc.stdout
    a = {r["step"]: r["loss"] for r in read_metrics(straight)}
    b = {r["step"]: r["loss"] for r in read_metrics(split)}
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    va = load_model_tensors(straight / "checkpoints" / "step-4")[VALUES]
    vb = load_model_tensors(split / "checkpoints" / "step-4")[VALUES]
    assert torch.equal(va, vb)


def test_lora_finetune_under_fsdp_two_ranks(base, tmp_path):
    run = tmp_path / "lora2"
    _ok(
        run_trainer(
            [
                *TINY,
                f"--job.dump_folder={run}",
                "--training.mode=lora_finetune",
                f"--checkpoint.initial_load_path={base}",
                "--data.regime=facts",
                "--training.micro_batch_size=2",
                "--training.global_batch_size=4",
                "--training.steps=2",
                "--finetune.lora_rank=2",
                "--optimizer.lr=0.01",
            ],
            nproc=2,
        )
    )
    before, after = load_model_tensors(base), load_model_tensors(run / "checkpoints" / "step-2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(k.endswith(".lora_b") and after[k].abs().sum() > 0 for k in after)


def test_sparse_finetune_learns_repeated_facts(base, tmp_path):
    """Updating only top-t value rows still learns: one person's 6 facts, cycled, get cheaper every epoch."""
    run = _finetune(
        base,
        tmp_path,
        "--data.synthetic_new_people=1",
        "--training.steps=18",
        "--optimizer.lr=20",
        "--finetune.top_t=20",
    )
    loss = [r["loss"] for r in read_metrics(run)]
    epochs = [sum(loss[i : i + 6]) / 6 for i in range(0, 18, 6)]
    assert epochs[2] < epochs[1] < epochs[0], epochs


def test_counts_of_another_checkpoint_are_refused(base, tmp_path):
    import shutil

    other = tmp_path / "copy" / "step-3"
    shutil.copytree(base, other)  # same weights, but the counts file names the original checkpoint
    args = [
        *TINY,
        f"--job.dump_folder={tmp_path / 'x'}",
        "--training.mode=sparse_finetune",
        f"--checkpoint.initial_load_path={other}",
        "--data.regime=facts",
        "--training.steps=1",
        "--training.micro_batch_size=4",
        "--training.global_batch_size=4",
    ]
    proc = run_trainer(args)
    assert proc.returncode == 2 and "counted on checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    _ok(run_trainer([*args, "--finetune.check_counts_checkpoint=false"]))


def test_shared_pool_gradient_is_read_once_at_the_union_of_rows():
    """Two layers reading one value pool: a row both select gets its (already summed) gradient once."""
    table = torch.nn.Parameter(torch.zeros(10, 4))
    dense = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    rows_with_grad = torch.tensor([1, 3, 5, 7])
    table.grad = torch.sparse_coo_tensor(
        rows_with_grad.unsqueeze(0), dense[rows_with_grad], (10, 4), check_invariants=True
    )
    picks = {"layers.1.feed_forward": torch.tensor([3, 1]), "layers.3.feed_forward": torch.tensor([5, 3, 9])}
    tables = {name: table for name in picks}
    staged, selected = selected_row_gradients(tables, lambda name: picks[name], value_table_grads(tables))
    assert list(staged) == ["layers.1.feed_forward"]  # one entry per table
    rows, grads = staged["layers.1.feed_forward"]
    assert rows.tolist() == [1, 3, 5, 9]
    expected = dense[rows].clone()
    expected[rows == 9] = 0  # selected but no gradient
    assert torch.equal(grads, expected)
    assert selected == {name: r.tolist() for name, r in picks.items()}
    # Two tables: each keeps its own rows.
    other = torch.nn.Parameter(torch.zeros(10, 4))
    tables = {"a": table, "b": other}
    staged, _ = selected_row_gradients(tables, lambda name: torch.tensor([3]), value_table_grads(tables))
    assert set(staged) == {"a", "b"} and torch.equal(staged["b"][1], torch.zeros(1, 4))


def test_selection_before_the_last_backward_leaves_the_step_unchanged(tmp_path):
    """The selector chooses the rows after the step's last forward and the last backward computes those rows
    only: the gradient handed to the optimizer equals the full row-sparse gradient's rows, over two
    micro-batches (the first backward computes every row read, the last the chosen ones)."""
    from types import SimpleNamespace

    from conftest import tiny_transformer

    from titan_mem.modes.base import NextTokenLoss
    from titan_mem.sparse.select import SlotSelector

    finetune = SimpleNamespace(ranking="tf", top_t=5, top_t_rule="fixed", top_t_mass=0.5, top_t_alpha=0.01)
    torch.manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 12))
        batches.append({"input_ids": ids, "labels": ids.roll(-1, 1), "token_mask": torch.ones_like(ids) > 0})
    model = tiny_transformer(64)
    for p in model.parameters():
        p.requires_grad_(False)
    (table,) = {id(t): t for t in model.value_tables().values()}.values()
    table.requires_grad_(True)
    model.set_sparse_value_grad(True)
    objective = NextTokenLoss()
    total = sum(objective.count(b) for b in batches)

    def step(selector=None):
        table.grad = None
        for i, batch in enumerate(batches):
            loss, slots = objective(model, batch, total, True)
            if selector is not None:
                selector.before_backward(model, batch, slots, final=i == len(batches) - 1)
            loss.backward()
        return table.grad

    full = coalesced(step()).to_dense()
    tables = model.value_tables()
    selector = SlotSelector(model, None, finetune, None, tmp_path / "s.jsonl", value_table_grads(tables))
    last_backward_rows = []
    table.register_hook(lambda g: last_backward_rows.append(coalesced(g).indices()[0].numel()))
    step(selector)
    info = selector.prepare_gradients(model)
    (chosen,) = selector._chosen.values()
    assert info["slots_selected"] == 5 and 5 < info["slots_touched"]
    assert last_backward_rows[-1] == 5 < last_backward_rows[0]  # the last backward: the chosen rows only
    assert torch.equal(table.grad.indices()[0], chosen)
    torch.testing.assert_close(table.grad.values(), full[chosen])
    assert not hasattr(table, "grad_rows_only")
