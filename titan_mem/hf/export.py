"""titan_mem models out as HF folders (`config.json` + `model.safetensors`, no pickles).

A dense model becomes the Llama, Qwen2 or Qwen3 architecture it is (`transformers`'
`AutoModelForCausalLM.from_pretrained` loads it with no remote code, and vLLM or lm-eval's `hf` backend
with it). A model with memory layers has no `transformers` class of its own: it is written in the same
layout with architecture `TitanMemForCausalLM`, a `titan_mem` block (its base architecture, memory settings
and lineage, which knowledge patches are checked against) and `auto_map` pointing at the two files of
`hf/remote/` copied beside the weights, so `transformers` loads it with `trust_remote_code=True` (or with
none in a process that imported `titan_mem.hf.auto`); `titan_mem.hf.weights.load_hf_model` reads it back.
The numbers change in one way only: query/key rows go back from our interleaved RoPE pairing to HF's
half-split one (`weights.split_rope_rows`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from titan_mem.checkpoint.convert import load_any_model, lora_prefixes
from titan_mem.checkpoint.dcp_index import open_dcp
from titan_mem.checkpoint.files import atomic_dir
from titan_mem.checkpoint.patches import Lineage, read_lineage, state_lineage
from titan_mem.data import build_tokenizer
from titan_mem.data.hf_tokenizer import TOKENIZER_FILES, hf_tokenizer_folder
from titan_mem.errors import ConvertError
from titan_mem.hf.checkpoint_config import load_checkpoint_config
from titan_mem.hf.config import ARCHITECTURES, MEMORY_ARCHITECTURE, MEMORY_MODEL_TYPE, MODEL_TYPES
from titan_mem.hf.retrofit import model_args_for
from titan_mem.hf.weights import SINGLE, hf_name, is_rope_row_tensor, split_rope_rows
from titan_mem.models.args import ModelArgs

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# The remote code a memory model's folder carries (self-contained: torch and transformers only).
REMOTE_CODE_DIR = Path(__file__).parent / "remote"
REMOTE_CODE_FILES = ("configuration_titan_mem.py", "modeling_titan_mem.py")
AUTO_MAP = {
    "AutoConfig": "configuration_titan_mem.TitanMemConfig",
    "AutoModelForCausalLM": "modeling_titan_mem.TitanMemForCausalLM",
}


def base_architecture(args: ModelArgs) -> str:
    """The HF architecture whose decoder computes what ours does for `args` (refused: none does)."""
    for arch, variant in ARCHITECTURES.items():
        if variant == {"qkv_bias": args.qkv_bias, "qk_norm": args.qk_norm}:
            return arch
    raise ConvertError(
        "model", "qkv_bias with qk_norm has no HF architecture (Qwen2 has one, Qwen3 the other)"
    )


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32, lineage: Lineage | None = None) -> dict:
    """config.json of `args`: the base architecture's keys, plus, for memory layers, the `titan_mem` block
    (with the exported weights' `lineage`, when given) and the `auto_map` of the remote code."""
    arch = base_architecture(args)
    config = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False if arch != "Qwen2ForCausalLM" else True,
        "mlp_bias": False,
        "use_sliding_window": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if args.rope_scaling_factor != 1.0:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    if args.memory.layers:
        config["architectures"] = [MEMORY_ARCHITECTURE]
        config["model_type"] = MEMORY_MODEL_TYPE
        config["auto_map"] = dict(AUTO_MAP)
        config["titan_mem"] = {"base_architecture": arch, "memory": dataclasses.asdict(args.memory)}
        if lineage is not None:
            config["titan_mem"]["lineage"] = {"root": lineage.root_digest, "applied": list(lineage.applied)}
    return config


def hf_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Our model state dict under HF names (tied output dropped, RoPE rows split), floats cast to `dtype`."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        t = t.detach().to("cpu")
        if is_rope_row_tensor(name):
            t = split_rope_rows(t, args.head_dim)
        out[hf_name(name)] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return out


def export_hf(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_files: Sequence[Path] = (),
    overwrite: bool = False,
    lineage: Lineage | None = None,
) -> str:
    """Write the folder `out` (atomically: `<out>.partial`, renamed when complete); `tokenizer_files` (an HF
    tokenizer's tokenizer.json, tokenizer_config.json, ...) are copied beside the weights. A memory model
    records `lineage` (default: `state` as a root no patch has touched) for knowledge patches."""
    out = Path(out)
    if args.memory.layers and lineage is None:
        lineage = state_lineage(state)
    config = hf_config(args, dtype, lineage)
    tensors = hf_state_dict(state, args, dtype)
    with atomic_dir(out, overwrite) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / SINGLE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / Path(f).name)
        if args.memory.layers:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
    kind = MEMORY_ARCHITECTURE if args.memory.layers else base_architecture(args)
    return f"wrote {out}: {len(tensors)} tensors, {kind}"


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    dtype: str = "float32",
    overwrite: bool = False,
) -> str:
    """A run's checkpoint (its model rebuilt from the run's config; a sparse one applied onto its base) as an
    HF folder, with the run's HF tokenizer files when it used one."""
    checkpoint = Path(checkpoint)
    cfg = load_checkpoint_config(checkpoint, Path(config) if config else None, overrides)
    tokenizer = build_tokenizer(cfg.tokenizer)
    args = model_args_for(cfg, tokenizer.n_words)
    state, lineage, note = load_any_model(checkpoint)
    if lora_prefixes(state):
        raise ConvertError(
            checkpoint,
            "holds LoRA adapters: merge them first (convert_checkpoint.py export-model --merge-lora) or "
            "export them for PEFT (to-peft)",
        )
    folder = hf_tokenizer_folder(cfg.tokenizer.name)
    files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()] if folder else []
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if args.memory.layers and lineage is None:
        lineage = read_lineage(open_dcp(checkpoint))  # its sidecar (a patched checkpoint) or its own hashes
    return (
        export_hf(
            state, args, out, dtype=torch_dtype, tokenizer_files=files, overwrite=overwrite, lineage=lineage
        )
        + note
    )
