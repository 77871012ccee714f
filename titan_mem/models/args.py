"""Model hyper-parameters and the named flavors (sizes) a config can pick."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class MemoryArgs:
    """Product-key memory (Lample et al. 2019; Memory+ of Berges et al. 2024 "Memory Layers at Scale")."""

    layers: list[int] = field(default_factory=list)  # block indices whose FFN becomes a memory layer
    n_keys: int = 1024  # half-keys per product half; slots = n_keys**2
    heads: int = 4
    topk: int = 32  # slots read per head per token
    k_dim: int = 512  # full query/key size; each product half uses k_dim // 2
    v_dim: int = 1024  # value row size (-1 = model dim)
    plus: bool = True  # Memory+: value_proj(lookup * silu(gate_proj(x)))
    query_norm: str = "rms"  # none | rms | batchnorm (XLM PKM found query batch-norm helps)
    shared_values: bool = False  # one value pool for all memory layers

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden_dim: int = 768
    vocab_size: int = -1  # set from the tokenizer, padded to a multiple of 128
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    memory: MemoryArgs = field(default_factory=MemoryArgs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        m = self.memory
        checks = [
            (self.dim % self.n_heads == 0, f"model.dim {self.dim} not divisible by n_heads {self.n_heads}"),
            (self.n_heads % self.kv_heads == 0, f"model.n_heads {self.n_heads} not divisible by n_kv_heads"),
            (self.head_dim % 2 == 0, "model head dim must be even for RoPE"),
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
                raise ValueError(msg)

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


_MODEL_OVERRIDES = {
    "dim": "dim",
    "n_layers": "n_layers",
    "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads",
    "ffn_hidden_dim": "ffn_hidden_dim",
    "max_seq_len": "max_seq_len",
    "tie_embeddings": "tie_embeddings",
}
_MEMORY_OVERRIDES = {
    "memory_layers": "layers",
    "memory_n_keys": "n_keys",
    "memory_heads": "heads",
    "memory_topk": "topk",
    "memory_k_dim": "k_dim",
    "memory_v_dim": "v_dim",
    "memory_plus": "plus",
    "memory_query_norm": "query_norm",
    "memory_shared_values": "shared_values",
}


def build_model_args(model_cfg, vocab_size: int) -> ModelArgs:
    """Flavor defaults, then any non-None override from the [model] section, then validation."""
    if model_cfg.flavor not in FLAVORS:
        raise ValueError(f"model.flavor: unknown {model_cfg.flavor!r} (known: {', '.join(FLAVORS)})")
    base = FLAVORS[model_cfg.flavor]
    args = dataclasses.replace(base, memory=dataclasses.replace(base.memory, layers=list(base.memory.layers)))
    for key, attr in _MODEL_OVERRIDES.items():
        if getattr(model_cfg, key) is not None:
            setattr(args, attr, getattr(model_cfg, key))
    for key, attr in _MEMORY_OVERRIDES.items():
        if getattr(model_cfg, key) is not None:
            setattr(args.memory, attr, getattr(model_cfg, key))
    args.vocab_size = vocab_size
    args.validate()
    return args
