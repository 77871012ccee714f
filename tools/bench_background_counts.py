"""Benchmark: background counting that stops after the last memory layer vs a forward through the whole model.

    python tools/bench_background_counts.py CONFIG --checkpoint STEP_DIR [--section.key=value ...]
        [--batch-size 16] [--seq-len 64] [--batches 50] [--repeats 3] [--threads 1] [--out FILE]

Counting (Lin et al. 2025, sec. 3: df over N background batches) only needs the slots each memory layer reads,
so `Transformer.memory_slots` runs the blocks up to the last memory layer and neither the later blocks nor
the output layer (a vocab-sized matmul per token). This times the real job, `count_background`, on
CONFIG's model, data and a checkpoint of it, once as it runs and once with `memory_slots` replaced by the
full forward it ran before. The runs alternate on `--threads` torch threads (default 1); per variant the
median wall time and the median CPU time of this process are reported (on a shared machine CPU time is the
measure: wall time there depends on everyone else's load), and the two counts files must be equal (else it
exits non-zero). Prints one JSON object; `--out` also writes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from titan_mem.background_counts import count_background
from titan_mem.components.bench import machine_info, write_report
from titan_mem.config import parse_args
from titan_mem.models.transformer import Transformer
from titan_mem.sparse.counts import load_background_counts

EARLY_STOP = Transformer.memory_slots


def full_forward_slots(self: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block and the output layer, as counting ran before it stopped early."""
    return self.forward(tokens, return_slots=True)[1]


def same_counts(a: Path, b: Path) -> bool:
    x, y = load_background_counts(a), load_background_counts(b)
    return all(torch.equal(x.df[k], y.df[k]) and torch.equal(x.total[k], y.total[k]) for k in x.layers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint step folder of CONFIG's model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args()
    cfg = parse_args([args.config, *overrides])
    torch.set_num_threads(args.threads)
    variants = {"early_stop": EARLY_STOP, "full_forward": full_forward_slots}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.safetensors" for name in variants}
        for _ in range(args.repeats):
            for name, method in variants.items():
                Transformer.memory_slots = method  # read when the model is built and sharded
                t0, c0 = time.perf_counter(), time.process_time()
                count_background(
                    cfg, args.checkpoint, args.batches, args.batch_size, args.seq_len, files[name]
                )
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        Transformer.memory_slots = EARLY_STOP
        equal = same_counts(files["early_stop"], files["full_forward"])
    median_wall = {name: statistics.median(t) for name, t in wall.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    write_report(
        {
            "benchmark": "background_counts",
            "machine": machine_info(),
            "command": " ".join(["python", *sys.argv]),
            "shape": {"batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len},
            "threads": args.threads,
            "wall_s": wall,
            "cpu_s": cpu,
            "median_wall_s": median_wall,
            "median_cpu_s": median_cpu,
            "speedup_wall": median_wall["full_forward"] / median_wall["early_stop"],
            "speedup_cpu": median_cpu["full_forward"] / median_cpu["early_stop"],
            "counts_equal": equal,
        },
        args.out,
    )
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
