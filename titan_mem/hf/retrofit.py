"""Retrofitting a pretrained HF model with memory layers (Goyal et al. 2026, sec. 3.3, stage 1).

`[retrofit] base` names the model; its `config.json` gives the architecture (so a dry run needs no weights),
`[model] memory_*` keys the memory geometry, `retrofit.layers` the blocks that get a memory layer and
`retrofit.mode` how: `replace` discards the block's FFN (the paper), `add` keeps it and adds the memory's
output (values initialised to 0 behind a learned per-channel gate, so the retrofitted model starts equal to
its base bit for bit while the values get a gradient: models.memory.MemoryLayer). A new run starts from the
base's weights; each memory layer's Memory+ projections start as a slice of its block's FFN
(`ffn_shaped_projections`), the rest of it fresh; healing (`training.mode=heal`, on the LM loss or, for
`replace`, by distilling each dropped FFN into its memory layer: hf/distill.py), background counts and the
finetuning modes then run as for a native model.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from titan_mem.config import Config
from titan_mem.data.hub import HUB_NAME, snapshot
from titan_mem.data.tokenizer import padded_vocab_size
from titan_mem.errors import ConfigError, ConvertError, HubError
from titan_mem.hf.config import model_args_from_hf
from titan_mem.hf.weights import read_state_dict
from titan_mem.models.args import ModelArgs, build_model_args, model_overrides

# [model] keys a retrofit may set besides the memory geometry (everything else is the base's config.json)
_RETROFIT_MODEL_KEYS = {"max_seq_len"}


def resolve_base(base: str) -> Path:
    """The local folder of `retrofit.base`: the path itself, or a hub snapshot (`org/name`, downloaded
    once into the HF cache; weights as safetensors only)."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"retrofit.base: {base} is a file; expected an HF model folder or hub name")
        return path
    if not HUB_NAME.fullmatch(base):
        raise ConfigError(f"retrofit.base: {base}: no such folder (and not a hub name org/name)")
    try:
        return snapshot(base)
    except HubError as e:
        raise ConfigError(f"retrofit.base: {e}") from None


def retrofit_model_args(cfg: Config, n_words: int) -> ModelArgs:
    """The base's architecture with memory layers at `retrofit.layers` (geometry from [model] memory_*)."""
    folder = resolve_base(cfg.retrofit.base)
    try:
        args = model_args_from_hf(folder)
    except ConvertError as e:
        raise ConfigError(f"retrofit.base: {e}") from None
    memory = dataclasses.replace(args.memory)
    for o in model_overrides():
        value = getattr(cfg.model, o.key)
        if value is None:
            continue
        if o.key == "memory_layers":
            raise ConfigError("model.memory_layers: a retrofit's memory blocks are retrofit.layers")
        if not o.in_memory and o.key not in _RETROFIT_MODEL_KEYS:
            raise ConfigError(f"model.{o.key}: set by retrofit.base's config.json; remove the override")
        setattr(memory if o.in_memory else args, o.attr, value)
    if args.memory.layers and cfg.retrofit.layers:
        raise ConfigError(f"retrofit.layers: {cfg.retrofit.base} already has memory layers")
    if not args.memory.layers:  # a dense base: the retrofit's layers and mode
        memory.layers = list(cfg.retrofit.layers)
        memory.beside_ffn = cfg.retrofit.mode == "add"
    args.memory = memory
    if n_words > args.vocab_size:
        raise ConfigError(
            f"tokenizer.name: {n_words} tokens, more than retrofit.base's vocab_size {args.vocab_size}"
        )
    try:
        args.validate()
    except ValueError as e:
        raise ConfigError(str(e).replace("model.memory_layers", "retrofit.layers")) from None
    return args


def model_args_for(cfg: Config, n_words: int) -> ModelArgs:
    """The ModelArgs a job builds: a retrofit's (`[retrofit] base`), else the flavor with [model] overrides
    and the tokenizer's padded vocabulary. Every model builder and dry run goes through here."""
    if cfg.retrofit.base:
        return retrofit_model_args(cfg, n_words)
    return build_model_args(cfg.model, padded_vocab_size(n_words))


def _split_base(folder: Path, args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict[int, dict]]:
    """The base's weights under the retrofitted model's names, and the FFNs of the memory blocks:
    {block: {"w1.weight": ..., "w2.weight": ..., "w3.weight": ...}} (`replace` drops them from the first,
    `add` keeps them there as `dense_ffn`). A memory model's own folder (hf/export.py) is read as it is."""
    if model_args_from_hf(folder).memory.layers:
        return read_state_dict(folder, args), {}
    dense = dataclasses.replace(args, memory=dataclasses.replace(args.memory, layers=[], beside_ffn=False))
    state = read_state_dict(folder, dense)
    kept: dict[str, torch.Tensor] = {}
    ffns: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = re.match(r"^layers\.(\d+)\.feed_forward\.(.+)$", name)
        if m and int(m.group(1)) in args.memory.layers:
            ffns.setdefault(int(m.group(1)), {})[m.group(2)] = t
            if not args.memory.beside_ffn:
                continue
            name = f"layers.{m.group(1)}.dense_ffn.{m.group(2)}"
        kept[name] = t
    return kept, ffns


def ffn_shaped_projections(
    ffns: dict[int, dict[str, torch.Tensor]], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """Memory+ projections that start as the block's own FFN: gate_proj = w1's first v_dim rows, value_proj =
    w2's first v_dim columns (cycled where v_dim exceeds the FFN's width), so that the memory's output is
    `w2[:, :v](lookup * silu(w1[:v] x))`, the FFN with its up-projection `w3 x` swapped for a table lookup.

    Why: the values' gradient is `silu(gate_proj x) * value_proj^T dL/dout` and the output a value row can
    make is `value_proj` times it, so both follow these projections' scale. A depth-scaled random init
    (std 0.02 / sqrt(2 (layer + 1)), a from-scratch model's) is 53x smaller than SmolLM2-135M's w2 at block
    15 and its gate's output 5x smaller than the FFN's (the normed inputs there have RMS 0.15), so an SGD
    step on value rows moved the output ~(53 * 5)^2 times less than the paper's settings assume and sparse
    finetuning learned nothing at lr 2 (docs/benchmarks.md, "SmolLM2-135M"). The FFN's own projections
    fit the base's residual stream (Lin et al. 2025's memory replaces an FFN of that scale)."""
    if not args.memory.plus:
        return {}
    out: dict[str, torch.Tensor] = {}
    for block, ffn in ffns.items():
        w1, w2 = ffn["w1.weight"], ffn["w2.weight"]  # [hidden, dim], [dim, hidden]
        rows = torch.arange(args.v_dim) % w1.shape[0]
        out[f"layers.{block}.feed_forward.gate_proj.weight"] = w1[rows].clone()
        out[f"layers.{block}.feed_forward.value_proj.weight"] = w2[:, rows].clone()
    return out


def base_state_dict(folder: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The base model's weights under the retrofitted model's names: `replace` drops the FFNs of the memory
    blocks, `add` keeps them as `dense_ffn`; memory-layer tensors are absent (they start fresh)."""
    return _split_base(folder, args)[0]


def replaced_ffns(folder: Path, args: ModelArgs) -> dict[int, dict[str, torch.Tensor]]:
    """The base's FFN weights at the blocks a `replace` retrofit gives a memory layer, by block index: the
    teachers of a distillation heal (hf/distill.py); empty for `add`, which keeps them."""
    return {} if args.memory.beside_ffn else _split_base(folder, args)[1]


def retrofit_state_dict(folder: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """What a new retrofit run loads: the base's weights (`base_state_dict`) and each memory layer's
    FFN-shaped Memory+ projections (`ffn_shaped_projections`); keys, queries and values start fresh."""
    kept, ffns = _split_base(folder, args)
    return kept | ffn_shaped_projections(ffns, args)


def load_base_weights(
    model: nn.Module, folder: Path, args: ModelArgs, new_tensors: set[str] = frozenset()
) -> int:
    """Put the base's weights into the (sharded, initialised) retrofitted model; checks that what stays as
    initialised is exactly the memory layers and the mode's `new_tensors` (LoRA adapters). Returns the
    number of tensors loaded."""
    state = retrofit_state_dict(folder, args)
    memory = tuple(f"{name}." for name in model.memory_layers()) + ("shared_memory_values.",)
    fresh = sorted(
        n
        for n, _ in model.named_parameters()
        if n not in state and n not in new_tensors and not n.startswith(memory)
    )
    if fresh:
        raise ConvertError(folder, f"the base lacks {fresh[0]} ({len(fresh)} non-memory tensors)")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return len(state)
