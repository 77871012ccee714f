"""Memory-parallel value tables (parallel/memory_parallel.py) on 2 gloo ranks: equal to a whole table, DCP
round trips 2 -> 1 -> 2 ranks, and the trainer's pretraining and sparse finetuning on split tables."""

import json

import torch
from conftest import (
    load_model_tensors,
    read_metrics,
    run_dist_script,
    run_tool,
    run_trainer,
    sparse_finetune_args,
)
from conftest import ok as _ok


def _script(nproc: int, *args: str):
    return run_dist_script("memory_parallel.py", nproc, list(args))


def test_two_ranks_equal_one_whole_table_outputs_and_gradients():
    """Forward, weight and table gradients (dense and row-sparse) for one group of 2 and 2 replicas of 1."""
    _ok(_script(2, "equivalence"))


def test_dcp_reshards_the_split_table_and_its_adamw_state(tmp_path):
    """Saved split over 2 ranks; loaded on 1 rank split (group of 1) and whole (memory parallelism off);
    saved again and loaded on 2 ranks, as one group and as 2 replicas: bit for bit every time."""
    ck, ref = str(tmp_path / "ck"), str(tmp_path / "ck.ref.pt")
    _ok(_script(2, "save", ck, "2"))
    _ok(_script(1, "load", ck, "1", ref))
    _ok(_script(1, "load", ck, "0", ref))
    _ok(_script(2, "load", ck + ".re", "2", ref))
    _ok(_script(2, "load", ck + ".re", "1", ref))


VALUES = "layers.1.feed_forward.values.weight"  # the tiny model's memory value table
ROW_ADAMW = [
    "--optimizer.name=adamw",
    "--optimizer.lr=0.01",
    "--optimizer.memory_weight_decay=0.1",
    "--training.micro_batch_size=1",  # 2 micro-batches per rank: gradients accumulate
]


def test_sparse_finetune_on_split_table_changes_only_selected_rows_and_resumes_exactly(pretrained, tmp_path):
    """2 ranks, each holding half of every value row's columns: the knowledge patch holds whole rows (only
    selected ones changed), and a resume from it (rows and row-AdamW state split again) continues exactly."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _ok(run_trainer(sparse_finetune_args(pretrained, straight, *ROW_ADAMW), nproc=2))
    args = sparse_finetune_args(pretrained, split, *ROW_ADAMW)
    _ok(run_trainer([*args, "--training.steps=2"], nproc=2))
    assert "resumed from" in _ok(run_trainer(args, nproc=2)).stdout
    losses = [[r["loss"] for r in read_metrics(run)] for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    before = load_model_tensors(pretrained)
    after = {run: load_model_tensors(run / "checkpoints" / "step-4") for run in (straight, split)}
    assert torch.equal(after[straight][VALUES], after[split][VALUES])
    assert all(torch.equal(before[k], after[straight][k]) for k in before if k != VALUES)
    changed = torch.ne(before[VALUES], after[straight][VALUES]).any(dim=1).nonzero().flatten().tolist()
    records = [json.loads(x) for x in (straight / "selected_slots.jsonl").read_text().splitlines()]
    selected = {row for rec in records for row in rec["selected"]["layers.1.feed_forward"]}
    assert changed and set(changed) <= selected


def test_bench_counts_the_table_traffic_the_formulas_predict(tmp_path):
    """tools/bench_memory_layer.py on 2 CPU ranks: the collectives of a real micro-batch (FSDP-gathered vs
    memory-parallel table) differ by exactly the bytes parallel/comm_volume.py computes."""
    out = tmp_path / "bench.json"
    _ok(run_tool("bench_memory_layer.py", ["--skip-kernels", "--out", str(out)]))
    comm = json.loads(out.read_text())["comm_measured_2_cpu_ranks"]
    assert comm["measured_difference_bytes"] == comm["computed_difference_bytes"] > 0
    assert comm["memory_parallel"]["bytes"]["alltoall_base"] > 0
    assert comm["memory_parallel"]["total_bytes"] < comm["fsdp"]["total_bytes"] / 3
