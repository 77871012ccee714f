"""Benchmark: greedy generation tokens/s with the KV cache vs recomputing the whole sequence every step.

    python tools/bench_generate.py [CONFIG.toml] [--section.key=value ...] [--batch-sizes 1,8]
        [--prompt-len 64] [--new-tokens 64] [--repeats 5] [--threads N] [--device auto|cpu|cuda] [--out FILE]

The model comes from CONFIG's [model] section (default train_configs/debug_model.toml, i.e. the `debug`
flavor) and its tokenizer's vocabulary, randomly initialised (speed does not depend on the weights) and
unsharded. Prompts are random token ids of `--prompt-len`; no EOS, so every row makes `--new-tokens` new
tokens. tokens/s = new tokens of the batch / median wall time of one `greedy_generate` call (after one
warm-up call). Prints one JSON object; `--out` also writes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from titan_mem.components.bench import machine_info, write_report
from titan_mem.config import parse_args
from titan_mem.data.tokenizer import build_tokenizer, padded_vocab_size
from titan_mem.eval.greedy import greedy_generate
from titan_mem.models.args import build_model_args
from titan_mem.models.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


def _time_call(model, prompts, new_tokens: int, use_cache: bool, repeats: int, device) -> dict:
    times, produced = [], 0
    for i in range(repeats + 1):  # the first call warms up (allocator, kernels) and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = greedy_generate(
            model, prompts, max_new_tokens=new_tokens, pad_id=0, eos_id=None, use_cache=use_cache
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        produced = sum(len(o) for o in out)
    median = statistics.median(times)
    return {
        "new_tokens": produced,
        "time_s_median": median,
        "time_s_min": min(times),
        "time_s_all": times,
        "tokens_per_s": produced / median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "train_configs/debug_model.toml"))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args()
    cfg = parse_args([args.config, *overrides])
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = build_model_args(cfg.model, padded_vocab_size(build_tokenizer(cfg.tokenizer).n_words))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(model_args)
        model.init_weights()
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(1, model_args.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        row = {"batch_size": batch}
        for name, use_cache in (("cache", True), ("no_cache", False)):
            row[name] = _time_call(model, prompts, args.new_tokens, use_cache, args.repeats, device)
        row["speedup_cache_over_no_cache"] = row["cache"]["tokens_per_s"] / row["no_cache"]["tokens_per_s"]
        results.append(row)
    write_report(
        {
            "benchmark": "generate",
            "machine": machine_info(),
            "command": " ".join(["python", *sys.argv]),
            "device": str(device),
            "model": {
                "flavor": cfg.model.flavor,
                "overrides": overrides,
                "vocab_size": model_args.vocab_size,
            },
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
