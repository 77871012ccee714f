"""HF safetensors weights (one file or an index of shards) as a titan_mem `Transformer` state dict.

Names map one to one; the one change of numbers is RoPE's pairing. HF's Llama-family attention rotates
(x_j, x_{j + d/2}) (`rotate_half`), ours rotates interleaved pairs (x_{2j}, x_{2j+1}) as Meta's reference
does; so the rows of each query/key head (and the q/k biases and q/k norm weights) are reordered
[first half | second half] -> interleaved, which gives the same attention scores exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from titan_mem.errors import ConvertError
from titan_mem.hf.config import model_args_from_hf
from titan_mem.models.args import ModelArgs
from titan_mem.models.transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IN_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# query/key tensors whose per-head rows follow the RoPE pairing (see the module docstring)
_ROPE_ROWS = ("attention.wq.", "attention.wk.", "attention.q_norm.", "attention.k_norm.")


def titan_name(hf_name: str) -> str | None:
    """Our parameter name for an HF one (None: not a parameter of ours, e.g. a rotary `inv_freq` buffer)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _IN_LAYER:
        return f"layers.{m.group(1)}.{_IN_LAYER[m.group(2)]}"
    return None


def interleave_rope_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from HF's half-split RoPE order to interleaved pairs: [h*d + j] -> position 2j for
    j < d/2, 2(j - d/2) + 1 otherwise (dim 0; a weight [H*d, in], a bias [H*d] or a norm weight [d])."""
    heads = t.shape[0] // head_dim
    rest = t.shape[1:]
    return t.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(t.shape)


def shard_files(folder: Path) -> dict[str, Path]:
    """{HF tensor name: the safetensors file holding it}, from the index of a sharded checkpoint or the one
    file; a shard the index names but the folder lacks is an error naming it."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConvertError(index, "not a safetensors index (no weight_map)") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConvertError(path, f"missing: {INDEX} lists this shard")
        return files
    single = folder / SINGLE
    if not single.is_file():
        raise ConvertError(folder, f"no {SINGLE} or {INDEX} (safetensors weights; pickles are not read)")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ConvertError(single, f"not a safetensors file ({e})") from None


def read_state_dict(folder: Path, args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """The `Transformer(args)` state dict of the HF weights in `folder`, cast to `dtype`; a missing, extra
    or wrongly shaped tensor is an error naming the file and tensor."""
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in shard_files(folder).items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt") as f:
                for hf_name in names:
                    ours = titan_name(hf_name)
                    if ours is None or ours not in expected:
                        if hf_name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise ConvertError(path, f"tensor {hf_name}: not part of a {_arch(args)} model")
                    t = f.get_tensor(hf_name)
                    if t.shape != expected[ours].shape:
                        raise ConvertError(
                            path,
                            f"tensor {hf_name}: shape {list(t.shape)}, config.json gives "
                            f"{list(expected[ours].shape)}",
                        )
                    if re.sub(r"^layers\.\d+\.", "", ours).startswith(_ROPE_ROWS):
                        t = interleave_rope_rows(t, args.head_dim)
                    out[ours] = t.to(dtype)
        except SafetensorError as e:
            raise ConvertError(path, f"not a safetensors file ({e})") from None
    if args.tie_embeddings:
        out.setdefault("output.weight", out.get("tok_embeddings.weight"))
    missing = sorted(k for k in expected if out.get(k) is None)
    if missing:
        raise ConvertError(folder, f"weights lack {missing[0]} ({len(missing)} tensors missing)")
    return out


def _arch(args: ModelArgs) -> str:
    return "Qwen3" if args.qk_norm else "Qwen2" if args.qkv_bias else "Llama"


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelArgs]:
    """(Transformer, ModelArgs) of the HF model folder, weights loaded, in eval mode on the CPU."""
    args = model_args_from_hf(folder)
    state = read_state_dict(folder, args, dtype)
    model = Transformer(args)
    for param in model.parameters():  # parameters only: the RoPE table stays complex64 (see rope_cache)
        param.data = param.data.to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval(), args
