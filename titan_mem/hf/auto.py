"""`import titan_mem.hf.auto` registers titan_mem's memory models with `transformers`' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads an exported memory model in this process with no remote
code (the classes are the same ones the folder carries, `hf/remote/`).

A module of its own rather than `titan_mem.hf`'s `__init__`: importing `transformers`' modeling code takes
seconds, and every training run imports `titan_mem.hf` (retrofit, GGUF reading) without needing it.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from titan_mem.hf.remote.configuration_titan_mem import TitanMemConfig
from titan_mem.hf.remote.modeling_titan_mem import TitanMemForCausalLM

AutoConfig.register(TitanMemConfig.model_type, TitanMemConfig, exist_ok=True)
AutoModelForCausalLM.register(TitanMemConfig, TitanMemForCausalLM, exist_ok=True)

__all__ = ["TitanMemConfig", "TitanMemForCausalLM"]
