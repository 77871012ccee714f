"""The README's sparse-finetuning recipe end to end: background counts over finetune-shaped batches let tf-idf
select rows the background does not read in every batch (docs/design.md, "Slot selection").

pretrain train_configs/debug_model.toml (50 of its 150 steps: the idf-0 result holds there too, see
docs/benchmarks.md) -> tools/background_counts.py --finetune-config train_configs/debug_sparse_finetune.toml
--batches 1000 -> sparse finetune with that config for a few steps, all in a tmp folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ok, run_tool, run_trainer
from safetensors import safe_open

PRETRAIN_STEPS = 50
FINETUNE = "train_configs/debug_sparse_finetune.toml"


@pytest.mark.heavy
def test_documented_pipeline_selects_few_idf0_rows(tmp_path):
    base_run = tmp_path / "debug_model"
    pretrain = ["train_configs/debug_model.toml", f"--job.dump_folder={base_run}"]
    ok(run_trainer([*pretrain, f"--training.steps={PRETRAIN_STEPS}"], timeout=600))
    step = base_run / "checkpoints" / f"step-{PRETRAIN_STEPS}"
    counts_args = [*pretrain, "--finetune-config", FINETUNE, "--checkpoint", str(step), "--batches", "1000"]
    ok(run_tool("background_counts.py", counts_args, timeout=600))
    counts = step / "background_counts.safetensors"  # the default place, where finetuning looks
    sft = tmp_path / "sft"
    finetune = [FINETUNE, f"--checkpoint.initial_load_path={step}", f"--job.dump_folder={sft}"]
    ok(run_trainer([*finetune, "--training.steps=5", "--checkpoint.enable=false"]))

    with safe_open(str(counts), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}
        df = {name: f.get_tensor(f"{name}.df") for name in meta["layers"]}
    assert (meta["batch_size"], meta["seq_len"], meta["n_batches"]) == (16, 64, 1000)
    records = [json.loads(x) for x in (sft / "selected_slots.jsonl").read_text().splitlines()]
    assert len(records) == 5
    selected = idf0 = 0
    for rec in records:
        for name, rows in rec["selected"].items():
            rows = torch.tensor(rows, dtype=torch.long)
            selected += rows.numel()
            idf0 += int((df[name][rows] == meta["n_batches"]).sum())  # idf = log((N+1)/(df+1)) = 0
    assert selected > 0
    assert idf0 / selected <= 0.05, f"{idf0} of {selected} selected rows have idf 0"
