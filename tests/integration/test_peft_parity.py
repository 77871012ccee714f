"""LoRA against PEFT (titan_mem/models/lora.py, titan_mem/hf/peft.py): on the same dense model, with the same
rank, alpha, targets, initial adapters, data and optimizer, titan_mem's LoRA and PEFT's reach the same losses
over 20 steps; our adapters exported in PEFT's format load with `PeftModel.from_pretrained` and give our
logits; a titan_mem LoRA run's checkpoint exports through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_DENSE, error_line, ok, run_tool, run_trainer

peft = pytest.importorskip("peft")

from titan_mem.hf.peft import ADAPTER_CONFIG, export_peft, peft_adapter  # noqa: E402
from titan_mem.hf.weights import load_hf_model  # noqa: E402
from titan_mem.models.lora import LoRALinear, add_lora, lora_parameter_names  # noqa: E402

OURS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
RANK, ALPHA, STEPS, LR = 4, 8.0, 20, 2e-3


def tiny_llama(folder) -> None:
    """A small Llama with grouped-query attention, transformers' own init, saved as an HF folder."""
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def with_lora(folder) -> tuple[torch.nn.Module, object]:
    """Our model of the folder with adapters on every attention and FFN projection, initialised seeded."""
    model, args = load_hf_model(folder)
    base = model.state_dict()
    add_lora(model, OURS, RANK, ALPHA)
    model.load_state_dict(base, strict=False)
    torch.manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.init_lora()
    for name, p in model.named_parameters():
        p.requires_grad_(name in lora_parameter_names(model))
    return model, args


def test_titan_mem_lora_trains_as_peft_lora_and_exports_to_it(tmp_path):
    tiny_llama(tmp_path / "base")
    ours, args = with_lora(tmp_path / "base")
    # PEFT on the same model with our initial adapters (PEFT's own init is the same distribution,
    # Kaiming-uniform A and zero B, from another random stream): loaded through our PEFT export's names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float()
    tensors, modules = peft_adapter(ours.state_dict(), args)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=sorted(modules))
    theirs = peft.get_peft_model(hf, config)
    result = peft.set_peft_model_state_dict(theirs, tensors)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {
        n for n in theirs.state_dict() if ".lora_" in n
    }
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    opt_theirs = torch.optim.AdamW(
        [p for p in theirs.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_theirs.param_groups[0]["params"]) == 2 * 14
    gen = torch.Generator().manual_seed(2)
    pattern = torch.randint(0, 96, (4, 8), generator=gen).repeat(1, 4)  # learnable: each row repeats
    ours.train(), theirs.train()
    losses = []
    for step in range(STEPS):
        tokens = pattern.roll(step, dims=1)
        logits = ours(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        their_loss = theirs(input_ids=tokens, labels=tokens).loss
        for opt, value in ((opt_ours, loss), (opt_theirs, their_loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
        losses.append((loss.item(), their_loss.item()))
    gaps = [abs(a - b) for a, b in losses]
    assert max(gaps) < 2e-4, losses
    assert losses[-1][0] < losses[0][0] - 0.25  # the adapters learned: the match is not of a model at rest

    # our trained adapters in PEFT's format, onto a fresh copy of the base: our logits
    print(export_peft(ours.state_dict(), args, tmp_path / "adapter", alpha=ALPHA, base_model="base"))
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["r"] == RANK
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    with torch.no_grad():
        base_logits = fresh(input_ids=pattern).logits
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=pattern).logits, ours(pattern), rtol=1e-5, atol=1e-5)
        assert (ours(pattern) - base_logits).abs().max() > 0.1  # the adapters count in what is compared


def test_a_lora_run_exports_its_adapters_through_the_cli(dense_hf, tmp_path):
    """pretrained dense model -> LoRA finetune -> to-peft: PEFT loads the adapters onto the base's HF export
    and gives the LoRA checkpoint's logits; a checkpoint without adapters is refused in one line."""
    base, base_hf = dense_hf
    lora = [
        *TINY_DENSE, "--training.mode=lora_finetune", f"--job.dump_folder={tmp_path / 'lora'}",
        f"--checkpoint.initial_load_path={base}", "--data.regime=facts", "--training.steps=2",
        "--finetune.lora_rank=4", "--finetune.lora_alpha=16", "--finetune.lora_targets=wq,wv,w2",
        "--optimizer.lr=1e-2",
    ]  # fmt: skip
    ok(run_trainer(lora))
    step = tmp_path / "lora" / "checkpoints" / "step-2"
    ok(run_tool("convert_checkpoint.py", ["to-peft", str(step), str(tmp_path / "adapter")]))
    error_line(run_tool("convert_checkpoint.py", ["to-peft", str(base), str(tmp_path / "none")]), "no LoRA")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16.0)
    assert len(config["target_modules"]) == 3 * 2  # wq, wv, w2 in each of the 2 blocks

    from titan_mem.checkpoint.convert import load_any_model, merge_lora

    merged = merge_lora(load_any_model(step)[0], 16.0, step)
    ours, _ = load_hf_model(base_hf)
    ours.load_state_dict({k: v for k, v in merged.items()}, strict=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
