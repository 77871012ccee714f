"""HF checkpoints in (titan_mem/hf): tiny random Llama, Qwen2 and Qwen3 models that `transformers` builds here
give the same logits in titan_mem's Transformer within fp32 tolerance, sharded or not, tied or not, with
Llama 3's RoPE scaling; bad folders get one line naming the file."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers  # the `hf` extra; dev installs it
from conftest import TINY, losses, ok, run_trainer

from titan_mem.errors import ConvertError
from titan_mem.hf.config import model_args_from_hf
from titan_mem.hf.weights import load_hf_model
from titan_mem.models.args import FLAVORS
from titan_mem.models.stats import param_counts
from titan_mem.models.transformer import Transformer

SMALL = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # wavelengths 4..16 blended, longer scaled: all three bands
}
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500000.0}),
    "llama3_scaling_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_theta": 10000.0, "rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True},
    ),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_wide_heads": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}),
}


def _hf_model(case: str, folder, shard: bool = False):
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # large random weights (norms and biases around 1): every tensor moves the logits
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_transformers_model(case, tmp_path):
    hf = _hf_model(case, tmp_path, shard=case == "llama")
    if case == "llama":
        assert (tmp_path / "model.safetensors.index.json").is_file()  # the sharded path is the one read
    ours, args = load_hf_model(tmp_path)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.std() > 1.0  # logits far from uniform: a wrong tensor could not hide in them
    assert args.tie_embeddings == ("tied" in case)
    assert ours.output.weight is ours.tok_embeddings.weight if args.tie_embeddings else True


def test_rope_scaling_changes_the_logits(tmp_path):
    """The llama3 case is not passing by accident: read without its scaling, the logits differ."""
    hf = _hf_model("llama3_scaling_tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            config[key] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain, _ = load_hf_model(tmp_path)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (plain(tokens) - hf(tokens).logits).abs().max() > 1e-2


def test_bad_folders_get_one_line_naming_the_file(tmp_path):
    _hf_model("qwen2_tied", tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def refused(folder, *needles):
        with pytest.raises(ConvertError) as e:
            load_hf_model(folder)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg

    refused(tmp_path / "empty", "config.json", "not found")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    refused(other, "config.json", "GPT2LMHeadModel", "not supported")
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    (other / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    refused(other, "model.safetensors", "shape")
    (other / "model.safetensors").unlink()
    (other / "config.json").write_text(json.dumps(config))
    refused(other, str(other), "no model.safetensors")

    sharded = tmp_path / "sharded"
    _hf_model("llama", sharded, shard=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[0]
    (sharded / lost).unlink()
    refused(sharded, lost, "missing")
    assert model_args_from_hf(sharded).n_kv_heads == 2


def test_the_qwen_attention_variants_train_in_the_trainer_and_are_counted(tmp_path):
    """q/k/v biases, q/k norms and a head size apart from dim / heads, on the memory model: counted as the
    module has them, and a run with all three trains (FSDP, checkpoint) like any other."""
    qwen = {"qkv_bias": True, "qk_norm": True, "attn_head_dim": 48}
    args = dataclasses.replace(FLAVORS["debug"], vocab_size=256, **qwen)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == param_counts(args).total
    variants = ["--model.qkv_bias=true", "--model.qk_norm=true", "--model.attn_head_dim=24"]
    ok(run_trainer([*TINY, f"--job.dump_folder={tmp_path / 'run'}", "--training.steps=3", *variants]))
    curve = losses(tmp_path / "run")
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values())
    assert (tmp_path / "run" / "checkpoints" / "step-3").is_dir()
