"""Benchmarks against the tools a user would pick instead (tools/bench_peers.py is their command line):
`memory_peers` (the memory layer and a sparse step vs product-key-memory and the papers' recipe),
`hf_peers` (SmolLM2 generation, evaluation and finetuning vs transformers, lm-eval and PEFT), `peers_report`
(the markdown tables of docs/benchmarks.md). The top layer: it reads everything and nothing reads it."""
