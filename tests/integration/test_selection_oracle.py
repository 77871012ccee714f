"""An end-to-end oracle for slot selection: the rows a sparse-finetune step says it chose
(`selected_slots.jsonl`) are recomputed from an independent forward of the base model over the same global
batch and the background file, with TF-IDF written out here (Lin et al. 2025, sec. 3: tf = c / C,
idf = log((N + 1) / (df + 1)); top t by score, ties to the lower slot id), not with the library's scorer."""

from __future__ import annotations

import json

import torch
from conftest import ok, run_trainer, sparse_finetune_args
from safetensors import safe_open

from titan_mem import config as config_mod
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.distributed import shutdown
from titan_mem.eval.runner import load_eval_model

TOP_T = 10  # sparse_finetune_args' finetune.top_t


def _oracle_selection(base, cfg) -> dict[str, list[int]]:
    """Top-t TF-IDF rows of every memory layer for the first global batch of `cfg`'s finetuning stream."""
    lm, _ = load_eval_model(base)  # makes a one-rank process group here; gone before the test ends
    try:
        return _top_t_rows(lm.model, base, cfg)
    finally:
        shutdown()


def _top_t_rows(model, base, cfg) -> dict[str, list[int]]:
    tokenizer = build_tokenizer(cfg.tokenizer)
    loader = build_dataloader(
        cfg.data, tokenizer, seq_len=cfg.training.seq_len, micro_batch_size=cfg.training.micro_batch_size,
        dp_rank=0, dp_world_size=1, global_batch_size=cfg.training.global_batch_size,
    )  # fmt: skip
    batch = next(iter(loader))
    assert cfg.training.micro_batch_size == cfg.training.global_batch_size  # one micro-batch per step
    slots: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, args, out, name=name: slots.__setitem__(
                name, mod.lookup_slots(args[0].flatten(0, 1))[1]
            )
        )
        for name, layer in model.memory_layers().items()
    ]
    with torch.no_grad():
        model(batch["input_ids"])
    for hook in hooks:
        hook.remove()
    counts_file = base / "background_counts.safetensors"
    with safe_open(str(counts_file), framework="pt") as f:
        n_batches = json.loads(f.metadata()["n_batches"])
        df = {name: f.get_tensor(f"{name}.df") for name in slots}
    mask = batch["token_mask"].reshape(-1)
    chosen = {}
    for name, ids in slots.items():
        n_slots = df[name].numel()
        c = torch.bincount(ids[mask].reshape(-1), minlength=n_slots).double()
        tf = c / c.sum()
        score = tf * torch.log((n_batches + 1) / (df[name].double() + 1))
        order = sorted((i for i in range(n_slots) if c[i] > 0), key=lambda i: (-float(score[i]), i))
        chosen[name] = sorted(order[:TOP_T])
    return chosen


def test_selected_rows_match_an_independent_recomputation(pretrained, tmp_path):
    run = tmp_path / "sft"
    args = sparse_finetune_args(pretrained, run, "--training.steps=1", "--checkpoint.enable=false")
    ok(run_trainer(args))
    record = json.loads((run / "selected_slots.jsonl").read_text().splitlines()[0])
    expected = _oracle_selection(pretrained, config_mod.parse_args(args))
    assert record["step"] == 1 and set(record["selected"]) == set(expected)
    for name, rows in expected.items():
        assert len(rows) == TOP_T
        assert record["selected"][name] == rows, name
