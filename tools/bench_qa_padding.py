"""Benchmark: the padding share of QA finetuning batches, fixed shape vs length buckets (data/buckets.py).

    python tools/bench_qa_padding.py [--source ../shared/data/triviaqa_3k.jsonl]
        [--tokenizer outputs/models/smollm2-135m/tokenizer.json] [--batch-size 16] [--seq-len 64]
        [--pools 0,4,16,64] [--multiples 8,4] [--out FILE]

One epoch of the real loader (data.regime=qa, shuffled, seed 0) per setting; padding = positions that are
not real tokens / all positions, the last batch's padding rows included. Pool 0 = no buckets (with multiple
0: the fixed batch shape training.seq_len). Prints one JSON object; `--out` also writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem.components.bench import machine_info, write_report
from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def padding(tok, source: str, batch_size: int, seq_len: int, pool: int, multiple: int) -> dict:
    cfg = DataConfig(source=source, regime="qa", bucket_batches=pool, pad_multiple=multiple)
    loader = build_dataloader(
        cfg, tok, seq_len=seq_len, micro_batch_size=batch_size, dp_rank=0, dp_world_size=1
    )
    steps = loader.dataset.steps_per_epoch
    it = iter(loader)
    real = total = 0
    for _ in range(steps):
        mask = next(it)["token_mask"]
        real, total = real + int(mask.sum()), total + mask.numel()
    return {"pool_batches": pool, "pad_multiple": multiple, "steps": steps, "padding": 1 - real / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "triviaqa_3k.jsonl"))
    parser.add_argument("--tokenizer", default="outputs/models/smollm2-135m/tokenizer.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--pools", default="0,4,16,64")
    parser.add_argument("--multiples", default="8,4")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tok = build_tokenizer(TokenizerConfig(name=args.tokenizer))
    settings = [(0, 0)] + [(int(p), int(m)) for m in args.multiples.split(",") for p in args.pools.split(",")]
    results = [padding(tok, args.source, args.batch_size, args.seq_len, p, m) for p, m in settings]
    write_report(
        {
            "benchmark": "qa_padding",
            "machine": machine_info(),
            "command": " ".join(["python", *sys.argv]),
            "source": args.source,
            "tokenizer": args.tokenizer,
            "batch": [args.batch_size, args.seq_len],
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
