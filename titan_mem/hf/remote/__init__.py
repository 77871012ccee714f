"""The `transformers` code titan_mem writes beside an exported memory model (remote code: torch and
transformers only, never titan_mem). `titan_mem.hf.auto` registers it in-process."""
