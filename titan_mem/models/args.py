"""Model hyper-parameters and the named flavors (sizes) a config can pick."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from titan_mem.errors import ConfigError


def _arg(default: Any, text: str, *, factory: Any = None, override: bool = True) -> Any:
    """A model hyper-parameter with its help line. Every field with `override` becomes a `[model]` config
    key (`--model.<name>`; memory fields as `--model.memory_<name>`) that replaces the flavor's value:
    adding a field here is the one edit a new hyper-parameter needs."""
    meta = {"help": text, "override": override}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MemoryArgs:
    """Product-key memory (Lample et al. 2019; Memory+ of Berges et al. 2024 "Memory Layers at Scale")."""

    layers: list[int] = _arg(None, "block indices whose FFN is a memory layer", factory=list)
    n_keys: int = _arg(1024, "half-keys per product half (slots = n_keys**2)")
    heads: int = _arg(4, "memory heads")
    topk: int = _arg(32, "slots read per head per token")
    k_dim: int = _arg(512, "full query/key size (each product half uses k_dim/2)")
    v_dim: int = _arg(1024, "value row size (-1 = model dim)")
    plus: bool = _arg(True, "Memory+ gated output: value_proj(lookup * silu(gate_proj(x))) (False = PKM)")
    query_norm: str = _arg("rms", "query normalisation: none | rms | batchnorm (XLM PKM: batch-norm helps)")
    shared_values: bool = _arg(False, "one value pool shared by all memory layers")
    # Retrofit `add` (Goyal et al. 2026; docs/design.md, "Retrofit peers' lessons"): the block keeps its
    # SwiGLU FFN and adds the memory's output times a learned per-channel gate (init 1) from value rows
    # initialised to 0, so the model starts equal to its base while the values get a gradient
    # (models.memory.MemoryLayer says why). Set by `[retrofit] mode`, not a [model] key: the base checkpoint
    # decides which FFNs exist.
    beside_ffn: bool = _arg(
        False, "memory added beside the block's FFN (zero-initialised values, gated output)", override=False
    )

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class ModelArgs:
    dim: int = _arg(256, "model width")
    n_layers: int = _arg(4, "transformer blocks")
    n_heads: int = _arg(4, "attention heads")
    n_kv_heads: int | None = _arg(None, "key/value heads (grouped-query attention; None = n_heads)")
    ffn_hidden_dim: int = _arg(768, "SwiGLU hidden size")
    vocab_size: int = _arg(-1, "set from the tokenizer, padded to a multiple of 128", override=False)
    max_seq_len: int = _arg(2048, "maximum sequence length (RoPE table size)")
    norm_eps: float = _arg(1e-5, "RMSNorm epsilon")
    rope_theta: float = _arg(10000.0, "RoPE base (Su et al. 2021)")
    rope_scaling_factor: float = _arg(1.0, "llama3 RoPE scaling: long wavelengths divided by this (1 = none)")
    rope_low_freq_factor: float = _arg(1.0, "llama3 RoPE scaling: wavelengths above L/this are scaled")
    rope_high_freq_factor: float = _arg(4.0, "llama3 RoPE scaling: wavelengths below L/this are kept")
    rope_original_max_seq_len: int = _arg(8192, "llama3 RoPE scaling: L, the pretraining context length")
    tie_embeddings: bool = _arg(False, "share the input embedding and the output projection")
    attn_head_dim: int | None = _arg(None, "size of one attention head (None = dim / n_heads; Qwen3 sets it)")
    qkv_bias: bool = _arg(False, "biases on the query/key/value projections (Qwen2)")
    qk_norm: bool = _arg(False, "RMSNorm of each query and key head before RoPE (Qwen3)")
    memory: MemoryArgs = _arg(None, "the memory layers", factory=MemoryArgs, override=False)

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        m = self.memory
        checks = [
            (
                self.attn_head_dim is not None or self.dim % self.n_heads == 0,
                f"model.dim {self.dim} not divisible by n_heads {self.n_heads}",
            ),
            (self.n_heads % self.kv_heads == 0, f"model.n_heads {self.n_heads} not divisible by n_kv_heads"),
            (self.head_dim % 2 == 0, "model head dim must be even for RoPE"),
            (
                self.rope_scaling_factor > 0,
                f"model.rope_scaling_factor {self.rope_scaling_factor}: must be > 0",
            ),
            (
                self.rope_scaling_factor == 1.0 or self.rope_high_freq_factor > self.rope_low_freq_factor,
                "model.rope_high_freq_factor must exceed model.rope_low_freq_factor",
            ),
            (self.vocab_size > 0, f"model.vocab_size must be set (got {self.vocab_size})"),
            (all(0 <= i < self.n_layers for i in m.layers), f"model.memory_layers {m.layers} out of range"),
            (len(set(m.layers)) == len(m.layers), f"model.memory_layers {m.layers} has duplicates"),
            (m.k_dim % 2 == 0, f"model.memory_k_dim {m.k_dim} must be even"),
            (0 < m.topk <= m.n_keys, f"model.memory_topk {m.topk} must be in [1, memory_n_keys={m.n_keys}]"),
            (m.query_norm in ("none", "rms", "batchnorm"), f"model.memory_query_norm {m.query_norm!r}"),
            (m.plus or m.v_dim in (-1, self.dim), "model.memory_plus=false needs memory_v_dim == dim"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def v_dim(self) -> int:
        return self.dim if self.memory.v_dim == -1 else self.memory.v_dim


FLAVORS: dict[str, ModelArgs] = {
    # Tiny: trains in about a minute on 2 CPU cores. 64**2 = 4096 slots, so slot statistics are meaningful.
    "debug": ModelArgs(
        dim=128,
        n_layers=4,
        n_heads=4,
        ffn_hidden_dim=384,
        max_seq_len=512,
        memory=MemoryArgs(layers=[2], n_keys=64, heads=2, topk=8, k_dim=64, v_dim=128),
    ),
    # Lin et al. 2025 (arXiv 2510.15103): 1.3B, 22 layers, dim 2048, FFN 8192, memory at layer 12 with
    # 1024**2 slots, 4 heads, k=32, value dim 1024, Memory+. k_dim 512 follows Berges et al.'s PKM setup.
    "1b": ModelArgs(
        dim=2048,
        n_layers=22,
        n_heads=16,
        n_kv_heads=16,
        ffn_hidden_dim=8192,
        max_seq_len=4096,
        rope_theta=500000.0,
        memory=MemoryArgs(layers=[12], n_keys=1024, heads=4, topk=32, k_dim=512, v_dim=1024, plus=True),
    ),
}


# The same models with a SwiGLU FFN in every block: the dense baselines (e.g. tools/bench_train_step.py).
FLAVORS["debug_dense"] = dataclasses.replace(FLAVORS["debug"], memory=MemoryArgs())
FLAVORS["1b_dense"] = dataclasses.replace(FLAVORS["1b"], memory=MemoryArgs())


@dataclass(frozen=True)
class Override:
    """One `[model]` config key and the hyper-parameter it replaces."""

    key: str  # the config key: the field name, memory fields prefixed with memory_
    in_memory: bool  # a MemoryArgs field (else ModelArgs)
    attr: str
    type: Any  # the field's type (resolved)
    help: str


def model_overrides() -> list[Override]:
    """Every overridable hyper-parameter of ModelArgs and MemoryArgs, in declaration order."""
    out = []
    for cls, in_memory in ((ModelArgs, False), (MemoryArgs, True)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("override"):
                key = f"memory_{f.name}" if in_memory else f.name
                out.append(Override(key, in_memory, f.name, hints[f.name], f.metadata["help"]))
    return out


def build_model_args(model_cfg: Any, vocab_size: int) -> ModelArgs:
    """Flavor defaults, then any non-None override from the [model] section, then validation."""
    if model_cfg.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor: unknown {model_cfg.flavor!r} (known: {', '.join(FLAVORS)})")
    base = FLAVORS[model_cfg.flavor]
    args = dataclasses.replace(base, memory=dataclasses.replace(base.memory, layers=list(base.memory.layers)))
    for o in model_overrides():
        value = getattr(model_cfg, o.key)
        if value is not None:
            setattr(args.memory if o.in_memory else args, o.attr, value)
    args.vocab_size = vocab_size
    args.validate()
    return args
