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
from titan_mem.models.transformer import Transformer, rope_cache

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

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


_FFN = {"w1.weight", "w2.weight", "w3.weight"}  # SwiGLU weights, whatever the block's module holds them
_FROM_OURS = {ours: hf for hf, ours in _IN_LAYER.items()}
_FROM_OURS_TOP = {ours: hf for hf, ours in _TOP.items()} | {
    "shared_memory_values.weight": "model.shared_memory_values.weight"
}
_OURS_IN_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_name(ours: str) -> str:
    """The HF tensor name of one of our state-dict names. Memory layers (ours only) keep their own names
    under `model.layers.N.memory.`; a retrofit's kept FFN (`dense_ffn`) is the block's HF `mlp`."""
    if ours in _FROM_OURS_TOP:
        return _FROM_OURS_TOP[ours]
    m = _OURS_IN_LAYER.match(ours)
    if m is None:
        raise KeyError(ours)
    layer, rest = m.groups()
    module, _, leaf = rest.partition(".")
    if module == "dense_ffn":
        rest = f"feed_forward.{leaf}"
    elif module == "feed_forward" and leaf not in _FFN:
        return f"model.layers.{layer}.memory.{leaf}"
    return f"model.layers.{layer}.{_FROM_OURS[rest]}"


def is_rope_row_tensor(ours: str) -> bool:
    """Whether a tensor's rows follow the RoPE pairing (query/key projections, biases and norms)."""
    return re.sub(r"^layers\.\d+\.", "", ours).startswith(_ROPE_ROWS)


def interleave_rope_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from HF's half-split RoPE order to interleaved pairs: [h*d + j] -> position 2j for
    j < d/2, 2(j - d/2) + 1 otherwise (dim 0; a weight [H*d, in], a bias [H*d] or a norm weight [d])."""
    heads = t.shape[0] // head_dim
    rest = t.shape[1:]
    return t.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(t.shape)


def split_rope_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `interleave_rope_rows`: our interleaved pairs back to HF's half-split order."""
    heads = t.shape[0] // head_dim
    rest = t.shape[1:]
    return t.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(t.shape)


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
        if not isinstance(weight_map, dict):
            raise ConvertError(index, "not a safetensors index (weight_map is not an object)")
        files = {name: folder / shard for name, shard in weight_map.items()}
        inside = folder.resolve()
        for path in sorted(set(files.values())):
            if path.resolve().parent != inside:  # '../x', an absolute path or a link out: not this model's
                raise ConvertError(index, f"shard {path.relative_to(folder)}: not a file of this folder")
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
    ours_of = {hf_name(k): k for k in expected}
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in shard_files(folder).items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    ours = ours_of.get(name)
                    if ours is None:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise ConvertError(path, f"tensor {name}: not part of a {_arch(args)} model")
                    t = f.get_tensor(name)
                    if t.shape != expected[ours].shape:
                        raise ConvertError(
                            path,
                            f"tensor {name}: shape {list(t.shape)}, config.json gives "
                            f"{list(expected[ours].shape)}",
                        )
                    if t.is_floating_point() != expected[ours].is_floating_point():
                        # e.g. quantized weights: cast to float, they would be a different model
                        raise ConvertError(
                            path, f"tensor {name}: dtype {t.dtype}, expected {expected[ours].dtype}"
                        )
                    if is_rope_row_tensor(ours):
                        t = interleave_rope_rows(t, args.head_dim)
                    out[ours] = t.to(dtype) if t.is_floating_point() else t
        except SafetensorError as e:
            raise ConvertError(path, f"not a safetensors file ({e})") from None
    if args.tie_embeddings:
        out["output.weight"] = _tied_output(folder, out)
    missing = sorted(k for k in expected if out.get(k) is None)
    if missing:
        raise ConvertError(folder, f"weights lack {missing[0]} ({len(missing)} tensors missing)")
    return out


def _tied_output(folder: Path, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The output layer of a tied model: the input embedding. A folder whose files also hold an
    `lm_head.weight` that differs from it is refused: transformers 5 then loads the two untied, earlier
    versions tie them (the embedding wins), so which model the folder is depends on who reads it."""
    embedding, head = state.get("tok_embeddings.weight"), state.get("output.weight")
    if embedding is not None and head is not None and not torch.equal(embedding, head):
        raise ConvertError(
            folder / "config.json",
            "tie_word_embeddings is true but lm_head.weight differs from the embedding (set it to false if "
            "the separate lm_head is meant, or drop lm_head.weight)",
        )
    return embedding


def _arch(args: ModelArgs) -> str:
    kind = "Qwen3" if args.qk_norm else "Qwen2" if args.qkv_bias else "Llama"
    return kind + (" memory" if args.memory.layers else "")


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelArgs]:
    """(Transformer, ModelArgs) of the HF model folder, weights loaded, in eval mode on the CPU."""
    args = model_args_from_hf(folder)
    state = read_state_dict(folder, args, dtype)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = rope_cache(args)  # the RoPE table stays complex64 whatever `dtype` (see rope_cache)
    return model.eval(), args
