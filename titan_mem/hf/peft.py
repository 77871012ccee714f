"""LoRA adapters out in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), so a titan_mem
LoRA finetune loads with `peft.PeftModel.from_pretrained` onto the base model's HF export (or the HF model it
was retrofitted from) and is shared like any other adapter.

The update is the same (Hu et al. 2021, eq. 3): h = W x + (alpha / r) B A x with PEFT's defaults (no rsLoRA,
no DoRA, no dropout at inference). Names map through `weights.hf_name`; only B's rows of query/key
projections change order, from our interleaved RoPE pairing to HF's half-split one (A acts on the input,
which RoPE does not touch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from titan_mem.checkpoint.convert import load_any_model, lora_prefixes
from titan_mem.checkpoint.files import atomic_dir
from titan_mem.data import build_tokenizer
from titan_mem.errors import ConvertError
from titan_mem.hf.checkpoint_config import load_checkpoint_config
from titan_mem.hf.retrofit import model_args_for
from titan_mem.hf.weights import hf_name, is_rope_row_tensor, split_rope_rows
from titan_mem.models.args import ModelArgs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the causal LM as `base_model.model`


def peft_adapter(
    state: dict[str, torch.Tensor], args: ModelArgs
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT tensors, the adapted HF module names) of the LoRA adapters in our model state dict."""
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for prefix in lora_prefixes(state):
        module = hf_name(f"{prefix}.weight").removesuffix(".weight")
        a, b = state[f"{prefix}.lora_a"].detach().cpu(), state[f"{prefix}.lora_b"].detach().cpu()
        if is_rope_row_tensor(f"{prefix}.weight"):
            b = split_rope_rows(b, args.head_dim)
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous().clone()
        modules.append(module)
    return tensors, modules


def adapter_config(modules: Sequence[str], rank: int, alpha: float, base_model: str = "") -> dict:
    """PEFT's LoraConfig for our adapters: every adapted module by its full name (so e.g. an adapted
    `q_proj` does not also select a memory layer's `query_proj`), PEFT's defaults otherwise."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_peft(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    out: str | Path,
    *,
    alpha: float,
    base_model: str = "",
    overwrite: bool = False,
) -> str:
    """Write the adapters of `state` to the folder `out` (atomically), rank read from their shapes."""
    out = Path(out)
    tensors, modules = peft_adapter(state, args)
    if not modules:
        raise ConvertError(out, "the model holds no LoRA adapters ('*.lora_a' / '*.lora_b') to export")
    ranks = {t.shape[0] for n, t in tensors.items() if n.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ConvertError(out, f"adapters of several ranks {sorted(ranks)}: PEFT's format holds one")
    config = adapter_config(modules, ranks.pop(), alpha, base_model)
    with atomic_dir(out, overwrite) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return f"wrote {out}: {len(modules)} LoRA adapters (r={config['r']}, alpha={alpha:g}) in PEFT's format"


def export_peft_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
    """A LoRA run's checkpoint -> its adapters in PEFT's format (alpha and base from the run's config)."""
    checkpoint = Path(checkpoint)
    cfg = load_checkpoint_config(checkpoint, Path(config) if config else None, overrides)
    args = model_args_for(cfg, build_tokenizer(cfg.tokenizer).n_words)
    state, _, _ = load_any_model(checkpoint)
    if not lora_prefixes(state):
        raise ConvertError(checkpoint, "holds no LoRA adapters (a lora_finetune run's checkpoint has them)")
    rank = next(t for n, t in state.items() if n.endswith(".lora_a")).shape[0]
    if rank != cfg.finetune.lora_rank:
        raise ConvertError(
            checkpoint, f"adapter rank {rank}, the run's finetune.lora_rank {cfg.finetune.lora_rank}"
        )
    base = cfg.retrofit.base or cfg.checkpoint.initial_load_path or ""
    return export_peft(
        state, args, out, alpha=cfg.finetune.lora_alpha, base_model=str(base), overwrite=overwrite
    )
