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


@pytest.mark.parametrize("same", [True, False])
def test_a_tied_model_whose_files_also_hold_an_lm_head(tmp_path, same):
    """tie_word_embeddings: the output layer *is* the embedding. An lm_head.weight in the files equal to it
    changes nothing; one that differs makes the folder ambiguous (transformers 5 unties the two, earlier
    versions tie them), so every titan_mem load path refuses it rather than guess."""
    from safetensors.torch import load_file, save_file

    from titan_mem.hf.retrofit import retrofit_state_dict

    _hf_model("qwen2_tied", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    embedding = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = embedding.clone() if same else torch.randn_like(embedding) * 3
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    args = model_args_from_hf(tmp_path)
    loads = (
        lambda: load_hf_model(tmp_path)[0].output.weight,
        lambda: retrofit_state_dict(tmp_path, args)["output.weight"],
    )
    for load in loads:
        if same:
            assert torch.equal(load(), embedding)
            continue
        with pytest.raises(ConvertError, match="tie_word_embeddings is true but lm_head.weight differs") as e:
            load()
        assert "config.json" in str(e.value) and "\n" not in str(e.value)
    if same:  # and it computes what transformers computes
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
        tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(
                load_hf_model(tmp_path)[0](tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4
            )


def _break(folder, case: str) -> None:
    """One way an HF folder is not the model its config names (or not a model at all)."""
    from safetensors.torch import load_file, save_file

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if case == "config_array":
        config_path.write_text(json.dumps([config]))
    elif case in ("model_type_other", "model_type_missing", "architectures_string"):
        if case == "model_type_other":
            config["model_type"] = "gpt_neo"
        elif case == "model_type_missing":
            del config["model_type"]
        else:
            config["architectures"] = "Qwen2ForCausalLM"
        config_path.write_text(json.dumps(config))
    elif case == "integer_weights":
        weights = load_file(folder / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"].round().to(torch.int32)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    elif case == "shard_outside":
        (folder.parent / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        names = load_file(folder / "model.safetensors")
        index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../outside.safetensors")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "case,needles",
    [
        ("config_array", ["config.json", "expected a JSON object"]),
        ("model_type_other", ["config.json", "model_type 'gpt_neo'", "'qwen2'"]),
        ("model_type_missing", ["config.json", "model_type None"]),
        ("architectures_string", ["config.json", "architectures: expected a list"]),
        (
            "integer_weights",
            ["model.safetensors", "model.norm.weight", "int32, expected torch.float32"],
        ),
        (
            "shard_outside",
            ["model.safetensors.index.json", "../outside.safetensors", "not a file of this folder"],
        ),
    ],
)
def test_a_folder_that_is_not_its_model_is_refused_by_every_load_path(tmp_path, case, needles):
    from titan_mem.hf.retrofit import retrofit_state_dict

    folder = tmp_path / "model"
    _hf_model("qwen2_tied", folder)
    args = model_args_from_hf(folder)
    _break(folder, case)
    for load in (lambda: load_hf_model(folder), lambda: retrofit_state_dict(folder, args)):
        with pytest.raises(ConvertError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
