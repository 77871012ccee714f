"""An HF `config.json` as titan_mem `ModelArgs`: the architectures whose decoder is ours (RMSNorm, RoPE,
grouped-query attention, SwiGLU), with their variations: q/k/v biases (Qwen2), per-head q/k RMSNorm
(Qwen3), a head size apart from dim / heads, tied embeddings, RoPE theta and Llama 3's RoPE scaling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from titan_mem.errors import ConvertError
from titan_mem.models.args import MemoryArgs, ModelArgs

# architecture -> what it adds to the Llama decoder
ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
}
# architecture -> the `model_type` transformers registers it under (a folder whose model_type disagrees is
# a different model to transformers, or none it knows; hf/export.py writes these)
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# A model with memory layers: its base architecture's config.json plus a `titan_mem` block
# ({"base_architecture": ..., "memory": MemoryArgs fields}); only titan_mem reads it (hf/export.py).
MEMORY_ARCHITECTURE = "TitanMemForCausalLM"
MEMORY_MODEL_TYPE = "titan_mem"


def memory_args_from(block: object, path: Path) -> MemoryArgs:
    """The `memory` entry of a config's `titan_mem` block as MemoryArgs; unknown keys are errors."""
    if not isinstance(block, dict):
        raise ConvertError(path, "titan_mem.memory: expected an object of memory settings")
    known = {f.name for f in dataclasses.fields(MemoryArgs)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ConvertError(path, f"titan_mem.memory: unknown key {unknown[0]!r}")
    return MemoryArgs(**block)


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConvertError(path, "not found (an HF model folder holds config.json and its safetensors)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(path, f"expected a JSON object of model settings, got a {type(config).__name__}")
    return config


def _rope(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """RoPE theta and scaling from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind != "llama3":
        raise ConvertError(path, f"rope scaling {kind!r} is not supported (known: default, llama3)")
    return {
        "rope_theta": float(theta),
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_original_max_seq_len": int(scaling["original_max_position_embeddings"]),
    }


def model_args_from_hf(folder: Path) -> ModelArgs:
    """The dense `ModelArgs` of the HF model in `folder`; anything our decoder would compute differently is
    refused with one line naming config.json and the key."""
    path = Path(folder) / "config.json"
    config = read_config(folder)
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ConvertError(path, f"architectures: expected a list of names, got {archs!r}")
    memory, model_type = MemoryArgs(), config.get("model_type")
    if MEMORY_ARCHITECTURE in archs:
        if model_type != MEMORY_MODEL_TYPE:
            raise ConvertError(
                path, f"model_type {model_type!r}: {MEMORY_ARCHITECTURE} needs {MEMORY_MODEL_TYPE!r}"
            )
        block = config.get("titan_mem")
        if not isinstance(block, dict):
            raise ConvertError(path, f"{MEMORY_ARCHITECTURE} needs a 'titan_mem' object")
        archs = [block.get("base_architecture")]
        memory = memory_args_from(block.get("memory"), path)
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConvertError(path, f"architectures {archs}: not supported (known: {', '.join(ARCHITECTURES)})")
    if memory == MemoryArgs() and model_type != MODEL_TYPES[arch]:
        raise ConvertError(
            path, f"model_type {model_type!r}: {arch} is {MODEL_TYPES[arch]!r} to transformers"
        )
    refused = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(config.get("mlp_bias", False)),
        "attention_bias": arch == "LlamaForCausalLM" and bool(config.get("attention_bias", False)),
        "use_sliding_window": bool(config.get("use_sliding_window", False)),
    }
    for key, bad in refused.items():
        if bad:
            raise ConvertError(path, f"{key}={config.get(key)!r}: not supported by titan_mem's decoder")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or dim // heads)
        args = ModelArgs(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            ffn_hidden_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attn_head_dim=None if head_dim * heads == dim else head_dim,
            memory=memory,
            **ARCHITECTURES[arch],
            **_rope(config, path),
        )
        args.validate()
    except KeyError as e:
        raise ConvertError(path, f"missing key {e.args[0]!r} ({arch})") from None
    except (TypeError, ValueError) as e:
        raise ConvertError(path, str(e)) from None
    return args
