"""Hugging Face checkpoints in: Llama-, Qwen2- and Qwen3-architecture folders read into titan_mem's
`Transformer` (Goyal et al. 2026 retrofit a pretrained Qwen2.5 model rather than pretrain from scratch)."""
