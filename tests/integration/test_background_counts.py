"""tools/background_counts.py counts finetune-shaped batches and records the shape; finetuning checks it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY, error_line, run_tool, run_trainer, sparse_finetune_args
from conftest import ok as _ok

from titan_mem.config import parse_args
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.models.args import MemoryArgs, ModelArgs
from titan_mem.models.transformer import Transformer
from titan_mem.sparse.counts import load_background_counts

LAYER = "layers.1.feed_forward"
READS = 2 * 4  # memory_heads x memory_topk of the TINY model


def _args(tmp_path, base, *extra: str) -> list[str]:
    return [
        "train_configs/debug_model.toml",
        *TINY,
        f"--job.dump_folder={tmp_path / 'run'}",
        f"--checkpoint.initial_load_path={base}",
        *extra,
    ]


def test_counts_record_the_batch_shape_and_real_tokens(pretrained, tmp_path):
    """tokens_per_batch is the mean non-padding count: padded fact batches make it less than B x L."""
    out = tmp_path / "facts.safetensors"
    extra = ["--data.regime=facts", "--data.synthetic_population=new"]
    args = _args(tmp_path, pretrained, *extra, "--batch-size", "4", "--seq-len", "32", "--batches", "3")
    _ok(run_tool("background_counts.py", [*args, "--out", str(out)]))
    meta = load_background_counts(out).metadata
    assert (meta["batch_size"], meta["seq_len"], meta["n_batches"]) == (4, 32, 3)
    # the same stream, read independently: 3 batches of 2 micro-batches of 2 sequences
    cfg = parse_args(["train_configs/debug_model.toml", *TINY, *extra])
    loader = build_dataloader(
        cfg.data,
        build_tokenizer(cfg.tokenizer),
        seq_len=32,
        micro_batch_size=2,
        dp_rank=0,
        dp_world_size=1,
        global_batch_size=4,
    )
    stream = iter(loader)
    tokens = sum(int(next(stream)["token_mask"].sum()) for _ in range(3 * 2))
    assert meta["tokens_per_batch"] == tokens / 3
    assert 0 < meta["tokens_per_batch"] < 4 * 32  # fact sequences are padded
    assert int(load_background_counts(out).total[LAYER].sum()) == tokens * READS


def test_finetune_config_gives_shape_checkpoint_and_output(pretrained, tmp_path):
    base = tmp_path / "base" / "step-3"  # a copy: the default output goes into the checkpoint folder
    shutil.copytree(pretrained, base, ignore=shutil.ignore_patterns("background_counts*"))
    ft = tmp_path / "ft.toml"
    ft.write_text(
        '[training]\nmode = "sparse_finetune"\nseq_len = 16\nglobal_batch_size = 8\nmicro_batch_size = 8\n'
        f'[data]\nregime = "facts"\n[checkpoint]\ninitial_load_path = "{base}"\n'
    )
    args = ["train_configs/debug_model.toml", *TINY, f"--job.dump_folder={tmp_path / 'run'}"]
    _ok(run_tool("background_counts.py", [*args, "--finetune-config", str(ft), "--batches", "2"]))
    counts = load_background_counts(base / "background_counts.safetensors")
    meta = counts.metadata
    assert (meta["batch_size"], meta["seq_len"], meta["tokens_per_batch"]) == (8, 16, 8 * 16.0)
    assert meta["checkpoint"] == str(base.resolve()) and meta["checkpoint_step"] == 3
    assert int(counts.total[LAYER].sum()) == 2 * 8 * 16 * READS


def test_no_batch_shape_is_refused(pretrained, tmp_path):
    out = tmp_path / "c.safetensors"
    line = error_line(run_tool("background_counts.py", [*_args(tmp_path, pretrained), "--out", str(out)]))
    assert "--finetune-config" in line and "saturate idf" in line and "README" in line
    line = error_line(
        run_tool(
            "background_counts.py", [*_args(tmp_path, pretrained, "--batch-size", "4"), "--out", str(out)]
        )
    )
    assert "--batch-size and --seq-len" in line
    too_long = _args(tmp_path, pretrained, "--batch-size", "4", "--seq-len", "100000", "--out", str(out))
    line = error_line(run_tool("background_counts.py", too_long))
    assert "--seq-len: 100000 exceeds the model's max_seq_len" in line
    assert not out.exists()


def test_finetune_refuses_counts_of_another_batch_shape(pretrained, tmp_path):
    """The fixture counted 4 x 32-token batches; a 2 x 16 finetune batch is 4x smaller (> tolerance 2)."""
    small = ["--training.micro_batch_size=2", "--training.global_batch_size=2", "--training.seq_len=16"]
    proc = run_trainer(sparse_finetune_args(pretrained, tmp_path / "a", *small, "--training.steps=1"))
    line = error_line(proc)
    assert "counted over 4 x 32-token batches, but this finetune's batches are 2 x 16" in line
    assert "ratio of tokens per batch 4.0 > tolerance 2.0" in line
    assert str(pretrained / "background_counts.safetensors") in line
    assert not (tmp_path / "a" / "checkpoints").exists()
    # the explicit override for ablations runs
    override = [*small, "--training.steps=1", "--finetune.counts_shape_tolerance=0"]
    _ok(run_trainer(sparse_finetune_args(pretrained, tmp_path / "b", *override)))
    assert (tmp_path / "b" / "selected_slots.jsonl").is_file()
    # within the tolerance: 4 x 64 tokens is 2x the counted batch
    within = ["--training.seq_len=64", "--training.steps=1"]
    _ok(run_trainer(sparse_finetune_args(pretrained, tmp_path / "c", *within)))


def test_memory_slots_run_only_up_to_the_last_memory_layer():
    """Transformer.memory_slots equals forward's slots bit for bit, and neither the block after the last
    memory layer nor the output layer runs."""
    args = ModelArgs(
        dim=32, n_layers=4, n_heads=2, ffn_hidden_dim=64, vocab_size=300, max_seq_len=32,
        memory=MemoryArgs(layers=[0, 2], n_keys=8, heads=2, topk=4, k_dim=16, v_dim=32),
    )  # fmt: skip
    args.validate()
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.eval()
    ran: list[str] = []
    for name in ("layers.0", "layers.2", "layers.3", "norm", "output"):
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: ran.append(name))
    tokens = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        short = model.memory_slots(tokens)
        assert ran == ["layers.0", "layers.2"]
        _, full = model(tokens, return_slots=True)
    assert list(short) == list(full) == ["layers.0.feed_forward", "layers.2.feed_forward"]
    assert all(torch.equal(short[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="sequence length 33 exceeds model max_seq_len 32"):
        model.memory_slots(torch.zeros(1, 33, dtype=torch.long))


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    """A 1-step checkpoint of the tiny model with a third block after its memory layer (block 1)."""
    root = tmp_path_factory.mktemp("three_blocks")
    _ok(run_trainer([*TINY, "--model.n_layers=3", f"--job.dump_folder={root / 'run'}", "--training.steps=1"]))
    return root / "run" / "checkpoints" / "step-1"


FULL_FORWARDS: list[int] = []


def _full_model_slots(self, tokens):
    """What background counting ran before it stopped early: every block and the output layer."""
    logits, slots = self.forward(tokens, return_slots=True)
    FULL_FORWARDS.append(logits.shape[-1])
    return slots


def test_counts_that_stop_early_equal_full_model_counts(three_blocks, tmp_path, monkeypatch):
    """Counting runs blocks 0-1 of 3 and no output layer, sharded by FSDP2 on 1 and 2 ranks (the skipped
    block stays sharded on both); its file equals, bit for bit, the one a full forward writes."""
    args = [
        "train_configs/debug_model.toml", *TINY, "--model.n_layers=3",
        f"--job.dump_folder={tmp_path / 'run'}", f"--checkpoint={three_blocks}",
        "--batch-size", "4", "--seq-len", "32", "--batches", "5",
    ]  # fmt: skip
    for nproc in (1, 2):
        _ok(
            run_tool(
                "background_counts.py", [*args, "--out", str(tmp_path / f"short{nproc}.st")], nproc=nproc
            )
        )
    monkeypatch.setattr(Transformer, "memory_slots", _full_model_slots)
    FULL_FORWARDS.clear()
    _ok(run_tool("background_counts.py", [*args, "--out", str(tmp_path / "full.st")]))
    assert len(FULL_FORWARDS) == 5 * 2  # 2 micro-batches of 2 sequences per batch, logits computed
    full = load_background_counts(tmp_path / "full.st")
    assert int(full.total[LAYER].sum()) == 5 * 4 * 32 * READS
    for nproc in (1, 2):
        short = load_background_counts(tmp_path / f"short{nproc}.st")
        assert {**short.metadata, "created": ""} == {**full.metadata, "created": ""}
        assert torch.equal(short.df[LAYER], full.df[LAYER]) and torch.equal(
            short.total[LAYER], full.total[LAYER]
        )
