"""Benchmark: training tokens/s and peak memory of the debug model with its memory layer vs a dense FFN.

Both variants run in one invocation, each in a fresh child process (so CPU peak RSS is per variant), with
the real Trainer (FSDP2 on one rank, synthetic data). Prints one JSON object; `--out` also writes it.
    python tools/bench_train_step.py [--steps 30] [--warmup 5] [--out outputs/bench_train_step.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(flavor: str, steps: int, warmup: int, extra: list[str]) -> dict:
    import torch

    from titan_mem.components.metrics import peak_memory_gib
    from titan_mem.config import parse_args
    from titan_mem.distributed import shutdown
    from titan_mem.models.stats import param_counts
    from titan_mem.train import Trainer

    run_dir = REPO / "outputs" / "bench_train_step" / flavor
    cfg = parse_args(
        [
            str(REPO / "train_configs/debug_model.toml"),
            f"--model.flavor={flavor}",
            f"--job.dump_folder={run_dir}",
            "--checkpoint.enable=false",
            f"--training.steps={steps + warmup}",
            *extra,
        ]
    )
    trainer = Trainer(cfg)
    times = []
    tokens = 0
    for i in range(steps + warmup):
        batches = trainer._next_batches()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        info = trainer.train_step(batches)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        trainer.step += 1
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens = info["tokens"]
    counts = param_counts(trainer.model_args)
    result = {
        "flavor": flavor,
        "device": str(trainer.device),
        "params_total": counts.total,
        "params_active_per_token": counts.active_per_token,
        "tokens_per_step": tokens,
        "step_time_s_median": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "peak_mem_gib": peak_memory_gib(trainer.device),
        "peak_mem_kind": "cuda max_memory_allocated" if trainer.device.type == "cuda" else "process peak RSS",
        "final_loss": info["loss"],
    }
    shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra --section.key=value for both variants")
    args, unknown = parser.parse_known_args()
    extra = [*args.overrides, *unknown]
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.warmup, extra)))
        return
    results = {}
    for flavor in ("debug", "debug_dense"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                flavor,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if proc.returncode != 0:
            sys.exit(f"bench_train_step: {flavor} failed: {proc.stderr.strip().splitlines()[-1:]}")
        results[flavor] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    report = {
        "benchmark": "train_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "memory_model": results["debug"],
        "dense_model": results["debug_dense"],
        "tokens_per_s_ratio_memory_over_dense": results["debug"]["tokens_per_s"]
        / results["debug_dense"]["tokens_per_s"],
        "peak_mem_ratio_memory_over_dense": results["debug"]["peak_mem_gib"]
        / results["debug_dense"]["peak_mem_gib"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
