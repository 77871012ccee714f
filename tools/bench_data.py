#!/usr/bin/env python
"""Benchmark the data loader: tokens/s on real prose, on one CPU core.

Why: the loader must never be what a training run waits for. A tiny model on CPU consumes roughly
5-20k tokens/s, a GPU run far more per rank, so this measures the whole pretraining path (read JSON
lines -> tokenize -> shuffle -> pack -> tensors) on one core: process pinned to CPU 0,
torch.set_num_threads(1), tiktoken single-threaded.

    python tools/bench_data.py                          # lambada_openai.jsonl from ../shared/data
    python tools/bench_data.py --out bench_data.json    # also write the JSON to a file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import tiktoken  # noqa: E402
import torch  # noqa: E402

from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lambada_openai.jsonl"


def bench_loader(cfg: DataConfig, tokenizer_name: str, *, seq_len: int, batch_size: int, tokens: int) -> dict:
    tok = build_tokenizer(TokenizerConfig(name=tokenizer_name, num_threads=1))
    t0 = time.perf_counter()
    loader = build_dataloader(
        cfg, tok, seq_len=seq_len, micro_batch_size=batch_size, dp_rank=0, dp_world_size=1
    )
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n_batches = max(1, tokens // (seq_len * batch_size))
    for _ in range(n_batches):
        next(it)
    t2 = time.perf_counter()
    n_tokens = n_batches * seq_len * batch_size
    streams = loader.state_dict()["streams"].values()
    return {
        "tokenizer": tokenizer_name,
        "vocab": tok.n_words,
        "seq_len": seq_len,
        "micro_batch_size": batch_size,
        "tokens": n_tokens,
        "seconds": round(t2 - t1, 3),
        "tokens_per_s": round(n_tokens / (t2 - t1)),
        "first_batch_s": round(t1 - t0, 3),
        "epochs_read": max(s["epoch"] for s in streams) + 1,
    }


def bench_tokenizer(path: Path, field: str, tokenizer_name: str) -> dict:
    """Encoding alone (no I/O, packing or tensors), to show what the loader adds."""
    tok = build_tokenizer(TokenizerConfig(name=tokenizer_name, num_threads=1))
    texts = [json.loads(line)[field] for line in path.read_text().split("\n") if line.strip()]
    t0 = time.perf_counter()
    n = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=1))
    dt = time.perf_counter() - t0
    return {"tokenizer": tokenizer_name, "documents": len(texts), "tokens": n, "tokens_per_s": round(n / dt),
            "mb_per_s": round(sum(len(t.encode()) for t in texts) / dt / 1e6, 2)}  # fmt: skip


def median_of(runs: int, fn, *args, **kwargs) -> dict:
    """Run `fn` several times; report the run with the median tokens/s and the spread."""
    results = sorted((fn(*args, **kwargs) for _ in range(runs)), key=lambda r: r["tokens_per_s"])
    best = dict(results[len(results) // 2])
    best["tokens_per_s_all_runs"] = [r["tokens_per_s"] for r in results]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSON-lines prose file")
    ap.add_argument("--text-field", default="context")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens to time per configuration")
    ap.add_argument("--runs", type=int, default=3, help="repeat each configuration, report the median")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"bench_data: no such file {args.data} (pass --data)")
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    prose = DataConfig(source=str(args.data), text_field=args.text_field, shuffle_buffer=1000)
    synthetic = DataConfig(source="synthetic")
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, tokens=args.tokens)
    results = {
        "benchmark": "titan_mem data loader, pretraining path, 1 CPU core",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tiktoken": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "",
            "torch_threads": torch.get_num_threads(),
        },
        "data": str(args.data.name),
        "loader": [
            {"corpus": args.data.name, **median_of(args.runs, bench_loader, prose, "cl100k_base", **kw)},
            {"corpus": args.data.name, **median_of(args.runs, bench_loader, prose, "debug", **kw)},
            {"corpus": "synthetic", **median_of(args.runs, bench_loader, synthetic, "debug", **kw)},
        ],
        "tokenizer_only": [median_of(args.runs, bench_tokenizer, args.data, args.text_field, "cl100k_base")],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
