#!/usr/bin/env python
"""Benchmark: does the data loader keep up while the model trains? Workers vs none, on the real trainer.

Why: with `data.num_workers=0` the training process reads and tokenizes each block of documents itself,
between steps, and every rank waits for it; with workers (the default where CPUs are spare) tokenizing
runs ahead in other processes. This runs the real trainer (one rank, CPU, a small memory-layer model,
real prose, the debug BPE: a cl100k output layer would make each CPU step take seconds) with each worker
count and reports the time steps waited for data (`data_wait_s`, logged by the trainer every step): mean,
max (a block of `shuffle_buffer` documents is tokenized at once) and share of the wall time, after step 1.

    python tools/bench_loader_workers.py --data ../shared/data/lambada_openai.jsonl [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_mem.components.bench import machine_info, write_report  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lambada_openai.jsonl"


def run_trainer(
    data: Path, text_field: str, workers: int, steps: int, extra: list[str], tokens_per_step: int
) -> dict:
    with tempfile.TemporaryDirectory() as run:
        cmd = [
            sys.executable, "-m", "titan_mem.train", "train_configs/debug_model.toml",
            f"--job.dump_folder={run}", f"--data.source={data}", f"--data.text_field={text_field}",
            f"--data.num_workers={workers}", f"--training.steps={steps}",
            "--metrics.log_freq=1", "--checkpoint.enable=false", *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(
                f"bench_loader_workers: the trainer failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            )
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "loss" in r and r["step"] > 1]
    wait = [r["data_wait_s"] for r in steady]
    return {
        "data.num_workers": workers,
        "steps_timed": len(steady),
        "data_wait_s_mean": round(statistics.mean(wait), 4),
        "data_wait_s_max": round(max(wait), 4),
        # share of the step (data + compute) spent waiting for data
        "data_wait_share": round(sum(wait) / sum(tokens_per_step / r["tokens_per_s"] for r in steady), 3),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in steady)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSON-lines prose file")
    ap.add_argument("--text-field", default="context")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--workers", default="0,1", help="worker counts to compare")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args, overrides = ap.parse_known_args()  # the rest: --section.key=value for the trainer
    if not args.data.is_file():
        sys.exit(f"bench_loader_workers: no such file {args.data} (pass --data)")
    shape = ["--model.dim=64", "--model.n_layers=4", "--model.n_heads=2", "--model.ffn_hidden_dim=128",
             "--model.memory_n_keys=32", "--model.memory_v_dim=64", "--model.memory_k_dim=32",
             "--training.seq_len=512", "--training.micro_batch_size=8", "--training.global_batch_size=8",
             "--data.shuffle_buffer=1000", "--data.streams=1"]  # fmt: skip
    data, extra = args.data.resolve(), [*shape, *overrides]
    rows = [
        run_trainer(data, args.text_field, int(w), args.steps, extra, 512 * 8)
        for w in args.workers.split(",")
    ]
    results = {
        "benchmark": "data wait per training step, data.num_workers compared, real trainer on CPU",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {**machine_info(), "cpus_usable": len(os.sched_getaffinity(0))},
        "trainer": ["train_configs/debug_model.toml", *shape, *overrides],
        "results": rows,
    }
    write_report(results, args.out)


if __name__ == "__main__":
    main()
