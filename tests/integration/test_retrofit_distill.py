"""Distillation heal of a `replace` retrofit (titan_mem/hf/distill.py, `retrofit.heal_objective=distill`):
each memory layer learns the FFN it replaced, on the base's own inputs, and nothing else trains. The base is
the dense model titan_mem pretrained itself and exported (`dense_hf`)."""

from __future__ import annotations

import pytest
import torch
from conftest import error_line, load_model_tensors, losses, ok, run_trainer
from test_retrofit import RUN, retro

from titan_mem.config import parse_args
from titan_mem.data import build_tokenizer
from titan_mem.hf.distill import FFNDistillation
from titan_mem.hf.retrofit import base_state_dict, model_args_for
from titan_mem.hf.weights import load_hf_model
from titan_mem.models.transformer import Transformer

DISTILL = ["--retrofit.mode=replace", "--retrofit.heal_objective=distill", "--training.mode=heal"]


def _replaced(folder, layers: str) -> Transformer:
    """The `replace` retrofit of `folder` at `layers`, memory layers trainable as healing leaves them."""
    cfg = parse_args(retro(folder, "--retrofit.mode=replace", f"--retrofit.layers={layers}"))
    args = model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.load_state_dict(base_state_dict(folder, args), strict=False)
    memory = tuple(f"{name}." for name in model.memory_layers())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(memory))
    return model


@pytest.mark.parametrize("layers", ["0", "0,1"])
def test_distill_loss_and_gradient_are_the_definitions_on_the_bases_inputs(dense_hf, layers):
    """Loss = mean over memory layers and sequences of sum |m - f|^2 / sum |f|^2 over real tokens, with f the
    base's FFN output and m the memory's, both on the base's own normalised input (also behind another
    memory layer: the stream goes on with the teacher's output); its gradient is that formula's; blocks after
    the last memory layer and the output layer are not run."""
    _, folder = dense_hf
    base, _ = load_hf_model(folder)
    model = _replaced(folder, layers)
    blocks = [int(i) for i in layers.split(",")]
    tokens = torch.randint(0, 3000, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False  # padding
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        base.layers[str(i)].feed_forward.register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0], out))
        )
        for i in blocks
    ]
    with torch.no_grad():
        base(tokens)
    for h in hooks:
        h.remove()
    want = 0.0
    for i in blocks:
        x, f = seen[i]
        m = model.layers[str(i)].feed_forward(x)
        w = mask[..., None].float()
        want = want + (((m - f) * w).square().sum((1, 2)) / (f * w).square().sum((1, 2))).sum() / (
            3 * len(blocks)
        )
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    ran = []
    model.layers["1"].register_forward_hook(lambda *a: ran.append("block 1"))
    model.output.register_forward_hook(lambda *a: ran.append("output"))
    objective = FFNDistillation.from_retrofit(model, folder, torch.device("cpu"))
    batch = {"input_ids": tokens, "token_mask": mask}
    assert objective.count(batch) == 3
    loss, slots = objective(model, batch, 3, False)
    loss.backward()
    assert slots == {} and ran == (["block 1"] if 1 in blocks else [])
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in want_grads.values())
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    assert not any(p.requires_grad for ffn in objective.teachers.values() for p in ffn.parameters())


def test_distill_heal_learns_the_dropped_ffn_and_keeps_the_base(dense_hf, tmp_path):
    """Eight distillation steps on prose lower the unexplained fraction of the FFN output, on one rank as on
    two (FSDP shards, column-split value tables); the checkpoint holds the base's tensors bit for bit and the
    memory layer, no teacher."""
    _, folder = dense_hf
    heal = [*DISTILL, "--training.steps=8", "--optimizer.lr=3e-3", "--data.regime=pretrain"]
    for nproc in (1, 2):
        ok(run_trainer([*retro(folder, *heal), f"--job.dump_folder={tmp_path / str(nproc)}"], nproc=nproc))
    one, two = losses(tmp_path / "1"), losses(tmp_path / "2")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    assert all(abs(one[s] - two[s]) <= 1e-5 * abs(one[s]) for s in one), (one, two)
    assert max(one[7], one[8]) < 0.5 * one[1], one  # the memory learns the FFN's output
    cfg = parse_args(retro(folder, *heal))
    base = base_state_dict(folder, model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words))
    for nproc in (1, 2):
        state = load_model_tensors(tmp_path / str(nproc) / "checkpoints" / "step-8")
        memory = {k for k in state if k.startswith("layers.1.feed_forward.")}
        assert memory and set(state) - memory == set(base)  # no teacher weights saved
        assert all(torch.equal(state[k], v) for k, v in base.items())


def test_distill_heal_resumes_exactly(dense_hf, tmp_path):
    _, folder = dense_hf
    heal = [*DISTILL, "--data.regime=pretrain", "--checkpoint.interval=2", "--optimizer.lr=1e-2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_trainer([*retro(folder, *heal), "--training.steps=4", f"--job.dump_folder={whole}"]))
    ok(run_trainer([*retro(folder, *heal), "--training.steps=2", f"--job.dump_folder={parts}"]))
    ok(run_trainer([*retro(folder, *heal), "--training.steps=4", f"--job.dump_folder={parts}"]))
    assert losses(parts) == losses(whole) and len(losses(whole)) == 4


def test_distill_bad_combinations_get_one_line(dense_hf, tmp_path):
    _, folder = dense_hf
    run = [f"--job.dump_folder={tmp_path / 'run'}", "--training.steps=1"]
    cases = [
        (retro(folder, *DISTILL, "--retrofit.mode=add"), "retrofit.heal_objective: distill", "mode=add"),
        ([*RUN, "--retrofit.heal_objective=distill", "--training.mode=heal"], "needs retrofit.base"),
        (retro(folder, *DISTILL, "--retrofit.layers="), "needs retrofit.base and retrofit.layers"),
        (retro(folder, *DISTILL, "--training.mode=full_finetune"), "training.mode=heal", "full_finetune"),
        (retro(folder, *DISTILL, "--training.activation_checkpoint=full"), "training.activation_checkpoint"),
        (retro(folder, *DISTILL, "--retrofit.heal_objective=kl"), "retrofit.heal_objective", "'kl'"),
    ]
    for args, *needles in cases:
        error_line(run_trainer([*args, *run]), *needles)
