"""`transformers` configuration of a titan_mem memory model: its base architecture's settings (Llama, Qwen2 or
Qwen3) plus a `titan_mem` block naming that base and the memory layers' settings.

Written by titan_mem beside an exported model (`auto_map` in config.json points here), so it depends on
`transformers` only: `AutoConfig.from_pretrained(folder, trust_remote_code=True)` reads it in a process that
has never seen titan_mem. `import titan_mem.hf.auto` registers the same class in-process (no remote code).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The decoders a memory model can be built on (titan_mem's `Transformer` computes each exactly).
BASE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# The settings of titan_mem's `MemoryArgs` this modeling file computes (all of them: a test keeps it so).
MEMORY_KEYS = {
    "layers": list,
    "n_keys": int,
    "heads": int,
    "topk": int,
    "k_dim": int,
    "v_dim": int,
    "plus": bool,
    "query_norm": str,
    "shared_values": bool,
    "beside_ffn": bool,
}
QUERY_NORMS = ("none", "rms", "batchnorm")


def check_titan_mem_block(block: Any) -> list[str]:
    """Why this modeling file cannot compute the model a `titan_mem` block describes (empty: it can)."""
    if not isinstance(block, dict):
        return ["titan_mem: expected an object with base_architecture and memory"]
    problems = []
    if block.get("base_architecture") not in BASE_ARCHITECTURES:
        problems.append(
            f"titan_mem.base_architecture {block.get('base_architecture')!r}: "
            f"expected one of {', '.join(BASE_ARCHITECTURES)}"
        )
    memory = block.get("memory")
    if not isinstance(memory, dict):
        return [*problems, "titan_mem.memory: expected an object of memory settings"]
    for key in sorted(set(memory) - set(MEMORY_KEYS)):
        problems.append(f"titan_mem.memory.{key}: a setting this modeling file does not know")
    for key, kind in MEMORY_KEYS.items():
        if key not in memory:
            problems.append(f"titan_mem.memory.{key}: missing")
        elif not isinstance(memory[key], kind) or (kind is int and isinstance(memory[key], bool)):
            problems.append(f"titan_mem.memory.{key}: expected {kind.__name__}, got {memory[key]!r}")
    if problems:
        return problems
    if memory["query_norm"] not in QUERY_NORMS:
        problems.append(
            f"titan_mem.memory.query_norm {memory['query_norm']!r}: expected one of {QUERY_NORMS}"
        )
    if memory["k_dim"] % 2 or not 0 < memory["topk"] <= memory["n_keys"] or not memory["layers"]:
        problems.append("titan_mem.memory: needs an even k_dim, 0 < topk <= n_keys and at least one layer")
    return problems


class TitanMemConfig(PretrainedConfig):
    """The base architecture's config keys (kept as attributes, as config.json has them) + `titan_mem`."""

    model_type = "titan_mem"

    def __init__(self, titan_mem: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.titan_mem = titan_mem if titan_mem is not None else {}
        super().__init__(**kwargs)

    @property
    def base_architecture(self) -> str:
        return self.titan_mem["base_architecture"]

    @property
    def memory(self) -> dict[str, Any]:
        return self.titan_mem["memory"]
