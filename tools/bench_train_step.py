"""Benchmark: training tokens/s and peak memory of the debug model with its memory layer vs a dense FFN.

Both variants run in one invocation, each in a fresh child process (so CPU peak RSS is per variant), with
the real Trainer (FSDP2 on one rank, synthetic data). Prints one JSON object; `--out` also writes it.
    python tools/bench_train_step.py [--pair debug|1b] [--steps 30] [--warmup 5] [--out FILE] [--k=v]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"debug": ("debug", "debug_dense"), "1b": ("1b", "1b_dense")}


def _child(flavor: str, steps: int, warmup: int, extra: list[str]) -> dict:
    from titan_mem.components.bench import time_train_steps
    from titan_mem.components.metrics import peak_memory_gib
    from titan_mem.config import parse_args
    from titan_mem.distributed import shutdown
    from titan_mem.models.stats import param_counts
    from titan_mem.train import Trainer

    cfg = parse_args(
        [
            str(REPO / "train_configs/debug_model.toml"),
            f"--model.flavor={flavor}",
            f"--job.dump_folder={REPO / 'outputs' / 'bench_train_step' / flavor}",
            "--checkpoint.enable=false",
            f"--training.steps={steps + warmup}",
            *extra,
        ]
    )
    trainer = Trainer(cfg)
    timing = time_train_steps(trainer, steps, warmup)
    counts = param_counts(trainer.model_args)
    result = {
        "flavor": flavor,
        "device": str(trainer.device),
        "params_total": counts.total,
        "params_active_per_token": counts.active_per_token,
        **timing,
        # MFU as the trainer logs it: tokens/s x training FLOPs a token / the device's peak (None on CPU)
        "mfu": (timing["tokens_per_s"] * trainer.flops_per_token / trainer.peak_flops)
        if trainer.peak_flops
        else None,
        "peak_mem_gib": peak_memory_gib(trainer.device),
        "peak_mem_kind": "cuda max_memory_allocated" if trainer.device.type == "cuda" else "process peak RSS",
    }
    shutdown()
    return result


def main() -> None:
    import json

    from titan_mem.components.bench import machine_info, run_child, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--pair", choices=sorted(PAIRS), default="debug", help="memory flavor and its dense twin"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.warmup, extra)))
        return
    results = {}
    memory_flavor, dense_flavor = PAIRS[args.pair]
    for flavor in (memory_flavor, dense_flavor):
        child_args = ["--child", flavor, "--steps", str(args.steps), "--warmup", str(args.warmup), *extra]
        results[flavor] = run_child(__file__, child_args, REPO)
    mem, dense = results[memory_flavor], results[dense_flavor]
    write_report(
        {
            "benchmark": "train_step",
            "machine": machine_info(),
            "overrides": extra,
            "memory_model": mem,
            "dense_model": dense,
            "tokens_per_s_ratio_memory_over_dense": mem["tokens_per_s"] / dense["tokens_per_s"],
            "peak_mem_ratio_memory_over_dense": mem["peak_mem_gib"] / dense["peak_mem_gib"],
        },
        args.out,
    )


if __name__ == "__main__":
    from titan_mem.distributed import exit_process

    main()
    exit_process(0)  # after shutdown(): skip the interpreter teardown (see exit_process)
