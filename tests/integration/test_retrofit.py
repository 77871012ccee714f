"""Retrofitting an HF model with memory layers in the Trainer (titan_mem/hf/retrofit.py; Goyal et al. 2026):
`add` starts equal to its base, healing trains only the memory layers, and the retrofitted model then goes
through background counts, sparse finetuning (checkpoint, exact resume), evaluation and HF export as a
native memory model does. The base is a dense model titan_mem pretrained itself and exported (`dense_hf`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY, error_line, load_model_tensors, losses, ok, run_tool, run_trainer

from titan_mem.config import parse_args
from titan_mem.data import build_tokenizer
from titan_mem.hf.retrofit import base_state_dict, model_args_for, retrofit_state_dict
from titan_mem.hf.weights import load_hf_model
from titan_mem.models.args import MemoryArgs
from titan_mem.models.memory import MemoryLayer
from titan_mem.models.transformer import Transformer

GEOMETRY = [a for a in TINY if a.startswith("--model.memory_") and not a.startswith("--model.memory_layers")]
RUN = [a for a in TINY if not a.startswith("--model.")]


def retro(folder, *extra: str) -> list[str]:
    """A retrofit of `folder` with a memory layer at block 1 (tiny geometry) on the tests' tiny batch."""
    return [*RUN, *GEOMETRY, f"--retrofit.base={folder}", "--retrofit.layers=1", *extra]


def _retrofitted(folder, mode: str) -> tuple[Transformer, object]:
    cfg = parse_args(retro(folder, f"--retrofit.mode={mode}"))
    args = model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    missing, unexpected = model.load_state_dict(retrofit_state_dict(folder, args), strict=False)
    assert not unexpected and all(".feed_forward." in k for k in missing) and missing
    return model.eval(), args


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_memory_projections_start_as_the_blocks_ffn(dense_hf, mode):
    """The Memory+ projections of a new retrofit are the block's FFN (gate_proj = w1's rows, value_proj =
    w2's columns, cycled past the FFN's width), so the values' gradient has the base's scale; everything
    else of the memory layer starts fresh."""
    _, folder = dense_hf
    model, args = _retrofitted(folder, mode)
    base = load_hf_model(folder)[0].state_dict()
    w1, w2 = base["layers.1.feed_forward.w1.weight"], base["layers.1.feed_forward.w2.weight"]
    rows = torch.arange(args.v_dim) % w1.shape[0]
    layer = model.layers["1"].feed_forward
    assert torch.equal(layer.gate_proj.weight, w1[rows]) and torch.equal(layer.value_proj.weight, w2[:, rows])
    if mode == "add":
        assert not layer.values.weight.any() and torch.equal(layer.out_gate, torch.ones(args.dim))


def test_add_reproduces_the_base_and_replace_does_not(dense_hf, tmp_path):
    _, folder = dense_hf
    base, _ = load_hf_model(folder)
    tokens = torch.randint(0, 3000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(tokens)
        added, args = _retrofitted(folder, "add")
        replaced, _ = _retrofitted(folder, "replace")
        assert torch.equal(added(tokens), want)  # values 0: bit for bit the base
        assert (replaced(tokens) - want).abs().max() > 1e-3  # the FFN is gone
    assert args.memory.layers == [1] and args.memory.beside_ffn
    # in the Trainer: the first step's loss (computed before any update) is the base's own
    common = ["--training.steps=1", "--data.regime=chat", "--optimizer.lr=0"]
    ok(
        run_trainer(
            [
                *retro(folder, "--retrofit.layers="),
                *common,
                "--training.mode=full_finetune",
                f"--job.dump_folder={tmp_path / 'base'}",
            ]
        )
    )
    ok(
        run_trainer(
            [
                *retro(folder, "--retrofit.mode=add"),
                *common,
                "--training.mode=heal",
                f"--job.dump_folder={tmp_path / 'add'}",
            ]
        )
    )
    assert losses(tmp_path / "add")[1] == losses(tmp_path / "base")[1]


@pytest.mark.parametrize("plus", [True, False])
def test_add_memory_outputs_exactly_zero_yet_its_values_get_a_gradient(plus):
    """An `add` memory starts with zero values and an open gate (1): its output is exactly 0 and its value
    rows get a gradient at step 0 (a zero gate gave them none: docs/results.md, "Retrofit")."""
    dim = 16
    args = MemoryArgs(layers=[0], n_keys=8, heads=2, topk=3, k_dim=8, v_dim=dim, plus=plus, beside_ffn=True)
    layer = MemoryLayer(dim, args, dim)
    torch.manual_seed(0)
    layer.init_weights()
    assert torch.equal(layer.out_gate, torch.ones(dim)) and not layer.values.weight.any()
    x = torch.randn(2, 5, dim)
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert layer.values.weight.grad.abs().sum(1).gt(0).sum() > 0  # the rows read get a gradient
    assert not layer.query_proj.weight.grad.any()  # the output does not depend on the query while values = 0


def test_add_starts_at_its_base_and_its_values_learn_from_step_0(dense_hf):
    """The retrofitted model's logits are the base's bit for bit, and the LM loss's gradient reaches the
    value table at step 0; a shared pool starts at zero too."""
    _, folder = dense_hf
    base, _ = load_hf_model(folder)
    tokens = torch.randint(0, 3000, (2, 32), generator=torch.Generator().manual_seed(1))
    added, args = _retrofitted(folder, "add")
    logits = added(tokens)
    with torch.no_grad():
        assert torch.equal(logits, base(tokens))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grad = added.layers["1"].feed_forward.values.weight.grad
    assert grad is not None and grad.abs().sum(1).gt(0).sum() > 0
    shared = dataclasses.replace(
        args, memory=dataclasses.replace(args.memory, layers=[0, 1], shared_values=True)
    )
    model = Transformer(shared)
    model.init_weights()
    assert not model.shared_memory_values.weight.any()
    assert all(
        torch.equal(b.feed_forward.out_gate, torch.ones(shared.dim))
        for b in model.layers.values()
        if b.is_memory
    )


def test_add_sparse_finetunes_from_its_unhealed_start(dense_hf, tmp_path):
    """From a checkpoint of the `add` retrofit as it starts (healed at lr 0: the FSDP-initialised,
    column-split shared pool, all zeros), sparse finetuning's first step moves the rows it selects: their
    gradient is not 0."""
    _, folder = dense_hf
    args = retro(folder, "--retrofit.mode=add", "--retrofit.layers=0,1", "--model.memory_shared_values=true")
    start = tmp_path / "start"
    heal = ["--training.mode=heal", "--data.regime=chat", "--training.steps=1", "--optimizer.lr=0"]
    ok(run_trainer([*args, *heal, f"--job.dump_folder={start}"]))
    step = start / "checkpoints" / "step-1"
    pool = "shared_memory_values.weight"
    start_pool = load_model_tensors(step)[pool]
    assert not start_pool.any()  # zero on the Trainer's init path as well
    sparse = [
        *args,
        f"--job.dump_folder={tmp_path / 'sparse'}",
        "--training.mode=sparse_finetune",
        f"--checkpoint.initial_load_path={step}",
        "--data.regime=facts",
        "--training.micro_batch_size=4",
        "--training.steps=1",
        "--optimizer.lr=2",
        "--finetune.ranking=tf",
        "--finetune.top_t=10",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
    ]
    ok(run_trainer(sparse))
    moved = load_model_tensors(tmp_path / "sparse" / "checkpoints" / "step-1")[pool].ne(start_pool).any(1)
    assert 0 < int(moved.sum()) <= 2 * 10  # rows moved, at most top_t per memory layer


@pytest.fixture(scope="module")
def healed(dense_hf, tmp_path_factory):
    """The dense base retrofitted (`add`) and healed for 4 steps on chat data, with background counts."""
    _, folder = dense_hf
    root = tmp_path_factory.mktemp("healed")
    args = retro(folder, "--retrofit.mode=add", f"--job.dump_folder={root / 'run'}")
    heal = ["--training.mode=heal", "--data.regime=chat", "--training.steps=4", "--optimizer.lr=1e-2"]
    ok(run_trainer([*args, *heal]))
    step = root / "run" / "checkpoints" / "step-4"
    shape = ["--batch-size", "4", "--seq-len", "32", "--batches", "8"]
    ok(
        run_tool(
            "background_counts.py", ["train_configs/debug_model.toml", *args, *shape, f"--checkpoint={step}"]
        )
    )
    return folder, step, args


def test_heal_trains_only_the_memory_layers(healed):
    folder, step, args = healed
    cfg = parse_args(args)
    state = load_model_tensors(step)
    base = base_state_dict(folder, model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words))
    memory = {k for k in state if k.startswith("layers.1.feed_forward.")}
    assert memory and set(state) - memory == set(base)
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name  # attention, kept FFN, norms, embeddings: untouched
    gate = state["layers.1.feed_forward.out_gate"]
    assert not torch.equal(gate, torch.ones_like(gate))  # the gate learned (it starts at 1)
    assert (state["layers.1.feed_forward.values.weight"] != 0).any()  # and the values (they start at 0)


def _sparse(healed, run, steps: int) -> list[str]:
    folder, step, args = healed
    return [
        *args,
        f"--job.dump_folder={run}",
        "--training.mode=sparse_finetune",
        f"--checkpoint.initial_load_path={step}",
        "--data.regime=facts",
        "--training.micro_batch_size=4",
        f"--training.steps={steps}",
        "--checkpoint.interval=2",
        "--optimizer.lr=2",
        "--finetune.top_t=10",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
    ]


def test_retrofitted_model_sparse_finetunes_resumes_evaluates_and_exports(healed, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_trainer(_sparse(healed, whole, 4)))
    ok(run_trainer(_sparse(healed, parts, 2)))
    ok(run_trainer(_sparse(healed, parts, 4)))  # resumes from its step 2
    assert losses(parts) == losses(whole) and len(losses(whole)) == 4
    final = whole / "checkpoints" / "step-4"
    assert (final / "patch.safetensors").is_file()  # a knowledge patch on the healed base
    tuned, resumed = load_model_tensors(final), load_model_tensors(parts / "checkpoints" / "step-4")
    assert all(torch.equal(tuned[k], resumed[k]) for k in tuned)
    base = load_model_tensors(healed[1])
    moved = (tuned["layers.1.feed_forward.values.weight"] != base["layers.1.feed_forward.values.weight"]).any(
        1
    )
    assert 0 < int(moved.sum()) <= 4 * 10  # rows moved, at most top_t per step
    assert all(torch.equal(tuned[k], base[k]) for k in base if "values" not in k)
    out = tmp_path / "eval.json"
    evaluated = ["--checkpoint", str(final), "--tasks", "synthetic_qa", "--limit", "4", "--no-progress"]
    ok(run_tool("evaluate.py", [*evaluated, "--out", str(out)]))
    results = json.loads(out.read_text())["results"]
    assert {r["task"] for r in results} >= {"synthetic_qa/new_taught", "synthetic_qa/known_val"}
    assert all(r["n"] > 0 for r in results)
    ok(run_tool("convert_checkpoint.py", ["to-hf", str(final), str(tmp_path / "hf")]))
    back, args = load_hf_model(tmp_path / "hf")
    assert args.memory.layers == [1] and args.memory.beside_ffn
    assert all(torch.equal(back.state_dict()[k], v) for k, v in tuned.items())
    # as a base (evaluation, retrofit.base) the exported folder is read as the memory model it holds, its
    # trained projections included (it was read as a dense base and refused its memory tensors)
    again = retrofit_state_dict(tmp_path / "hf", args)
    assert set(again) == set(tuned) and all(torch.equal(again[k], v) for k, v in tuned.items())


def test_retrofit_bad_inputs_get_one_line(dense_hf, tmp_path):
    _, folder = dense_hf
    run = [f"--job.dump_folder={tmp_path / 'run'}", "--training.steps=1"]
    cases = [
        (retro(folder, "--retrofit.layers=5"), "retrofit.layers"),
        (retro(folder, "--model.dim=32"), "model.dim: set by retrofit.base"),
        (retro(tmp_path / "nowhere"), "retrofit.base"),
        (retro(folder, "--training.mode=sparse_finetune"), "checkpoint.initial_load_path"),
        (retro(folder, "--retrofit.layers=", "--training.mode=heal"), "no memory layer"),
        ([*RUN, "--retrofit.layers=1"], "retrofit.layers: needs retrofit.base"),
    ]
    for args, needle in cases:
        error_line(run_trainer([*args, *run]), needle)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    error_line(run_trainer([*retro(tmp_path / "broken"), *run]), "GPT2LMHeadModel", "not supported")
    offline = run_trainer([*retro("nobody/no-such-model"), *run], env={"HF_HUB_OFFLINE": "1"})
    error_line(offline, "retrofit.base: nobody/no-such-model", "hub")


# Qwen2.5-0.5B-Instruct's config.json (the values the hub serves), without weights or tokenizer
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
}  # fmt: skip


def test_paper_config_dry_runs_from_config_json_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    base = ["train_configs/retrofit_qwen2.5_0.5b.toml", "--job.dry_run", f"--retrofit.base={tmp_path}"]
    dense = ok(run_trainer([*base, "--retrofit.layers="])).stdout
    assert "params total                   494,032,768" in dense  # Qwen2.5-0.5B's published 0.49B
    retro = ok(run_trainer(base)).stdout  # layers 8/12/16 replaced: 3 x (65,536 x 896) value parameters
    assert "params memory_values           176,160,768" in retro and "retrofit of" in retro


def test_retrofit_heals_on_two_ranks_as_on_one(dense_hf, tmp_path):
    """The base's weights reach FSDP shards and column-split value tables alike: two ranks (gloo) follow
    one rank's heal curve, and their checkpoint keeps every non-memory tensor of the base."""
    _, folder = dense_hf
    heal = ["--retrofit.mode=add", "--training.mode=heal", "--data.regime=chat", "--training.steps=3"]
    for nproc in (1, 2):
        ok(run_trainer([*retro(folder, *heal), f"--job.dump_folder={tmp_path / str(nproc)}"], nproc=nproc))
    one, two = losses(tmp_path / "1"), losses(tmp_path / "2")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert all(abs(one[s] - two[s]) <= 1e-5 * abs(one[s]) for s in one), (one, two)
    cfg = parse_args(retro(folder, *heal))
    base = base_state_dict(folder, model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words))
    state = load_model_tensors(tmp_path / "2" / "checkpoints" / "step-3")
    assert all(torch.equal(state[k], v) for k, v in base.items())
