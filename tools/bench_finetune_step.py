"""Benchmark: step time and peak memory of sparse vs full vs LoRA finetuning of the same model, one run.

For each memory size (`--n-keys`, slots = n_keys^2) it makes a base checkpoint and its background counts,
then times each finetuning mode in its own child process (real Trainer, synthetic fact batches). Sparse
finetuning should stay flat as the table grows (its cost scales with the rows touched); full finetuning
pays for the whole table (dense gradients and AdamW state). Each child also counts the bytes torch allocates
during one more step (profiler memory events, `components.bench.allocations`): a sparse step's total and
largest allocation must not grow with the table. `--bf16` runs the GPU's mixed precision on CPU (bf16
compute, fp32 table), the setting in which a table-sized cast would show; `--kernel triton` uses the Triton
lookup (on CPU only under TRITON_INTERPRET=1, at small sizes: the interpreter is slow).
    python tools/bench_finetune_step.py [--n-keys 64,256,1024] [--steps 20] [--bf16] [--kernel torch]
        [--modes sparse_finetune] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "train_configs/debug_model.toml")
FACTS = [
    "--data.regime=facts",
    "--training.seq_len=64",
    "--training.micro_batch_size=16",
    "--training.global_batch_size=16",
    "--lr_scheduler.warmup_steps=0",
    "--lr_scheduler.decay_type=constant",
]
COUNT_SHAPE = ["--batch-size", "16", "--seq-len", "64"]  # background batches of the FACTS batch shape
MODES = {
    "sparse_finetune": [
        "--training.mode=sparse_finetune",
        "--optimizer.name=sgd",
        "--optimizer.lr=2",
        "--finetune.top_t=500",
        "--training.max_norm=0",
    ],
    "sparse_finetune_adamw": [
        "--training.mode=sparse_finetune",
        "--optimizer.name=adamw",
        "--optimizer.lr=1e-3",
        "--finetune.top_t=500",
        "--training.max_norm=0",
    ],
    "full_finetune": ["--training.mode=full_finetune", "--optimizer.name=adamw", "--optimizer.lr=1e-5"],
    "lora_finetune": ["--training.mode=lora_finetune", "--optimizer.name=adamw", "--optimizer.lr=1e-4"],
}


def _child(mode: str, base: str, n_keys: int, steps: int, warmup: int, extra: list[str]) -> dict:
    import torch

    from titan_mem.components.bench import allocations, time_train_steps
    from titan_mem.components.metrics import peak_memory_gib
    from titan_mem.config import parse_args
    from titan_mem.distributed import shutdown
    from titan_mem.models.memory import is_value_table
    from titan_mem.train import Trainer

    cfg = parse_args(
        [
            CONFIG,
            f"--model.memory_n_keys={n_keys}",
            *FACTS,
            *MODES[mode],
            f"--job.dump_folder={REPO / 'outputs' / 'bench_finetune_step' / f'{mode}_{n_keys}'}",
            f"--checkpoint.initial_load_path={base}",
            "--checkpoint.enable=false",
            f"--training.steps={steps + warmup + 1}",
            *extra,
        ]
    )
    trainer = Trainer(cfg)
    timing = time_train_steps(trainer, steps, warmup)
    batches = trainer._next_batches()
    step_alloc = allocations(lambda: trainer.train_step(batches))
    trainable = sum(p.numel() for p in trainer.trainable)
    opt = trainer.optimizer
    if hasattr(opt, "updaters"):  # row-sparse: state only for rows ever updated
        state_rows = sum(u.n_state for u in opt.updaters.values())
        state_bytes = sum(
            v.numel() * v.element_size()
            for u in opt.updaters.values()
            for v in u.state_dict().values()
            if isinstance(v, torch.Tensor)
        )
    else:
        state_rows = None
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
    result = {
        "mode": mode,
        "n_slots": n_keys * n_keys,
        "device": str(trainer.device),
        **timing,
        "trainable_params": trainable,
        "optimizer_state_bytes": state_bytes,
        "optimizer_state_rows": state_rows,
        "peak_mem_gib": peak_memory_gib(trainer.device),
        "value_table_bytes": sum(
            p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if is_value_table(n)
        ),
        "step_alloc_total_bytes": step_alloc["total_bytes"],
        "step_alloc_largest_bytes": step_alloc["largest_bytes"],
        "step_alloc_count": step_alloc["count"],
    }
    shutdown()
    return result


def _make_base(n_keys: int, root: Path) -> Path:
    """A 2-step pretrained checkpoint plus 20 batches of background counts."""
    run = root / f"base_{n_keys}"
    common = [
        CONFIG,
        f"--model.memory_n_keys={n_keys}",
        f"--job.dump_folder={run}",
        "--training.steps=2",
        "--checkpoint.interval=2",
    ]
    env_cmd = [sys.executable, "-m", "titan_mem.train", *common]
    for cmd in (
        env_cmd,
        [sys.executable, str(REPO / "tools/background_counts.py"), *common, *COUNT_SHAPE, "--batches", "20"],
    ):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_finetune_step: making the base failed: {proc.stderr.strip().splitlines()[-1:]}")
    return run / "checkpoints" / "step-2"


def main() -> None:
    from titan_mem.components.bench import machine_info, run_child, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-keys", default="64,256", help="comma-separated half-key counts to sweep")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--bf16", action="store_true", help="bf16 compute on CPU (cpu_mixed_precision)")
    parser.add_argument("--kernel", default="auto", help="training.memory_kernel: auto | torch | triton")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = [f"--training.memory_kernel={args.kernel}"]
    if args.bf16:
        extra.append("--training.cpu_mixed_precision=true")
    if args.child:
        result = _child(args.child, args.base, int(args.n_keys), args.steps, args.warmup, extra)
        print(json.dumps(result))
        return
    root = REPO / "outputs" / "bench_finetune_step"
    results = []
    for n_keys in [int(x) for x in args.n_keys.split(",")]:
        base = _make_base(n_keys, root)
        for mode in args.modes.split(","):
            child = [
                "--child",
                mode,
                "--base",
                str(base),
                "--n-keys",
                str(n_keys),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--kernel",
                args.kernel,
                *(["--bf16"] if args.bf16 else []),
            ]
            results.append(run_child(__file__, child, REPO))
            r = results[-1]
            print(
                f"{mode} n_slots={n_keys**2}: {r['step_time_s_median'] * 1e3:.1f} ms/step, allocated "
                f"{r['step_alloc_total_bytes'] / 2**20:.2f} MiB/step (largest "
                f"{r['step_alloc_largest_bytes'] / 2**20:.2f} MiB; "
                f"table {r['value_table_bytes'] / 2**20:.0f} MiB)",
                file=sys.stderr,
            )
    write_report(
        {
            "benchmark": "finetune_step",
            "machine": machine_info(),
            "command": " ".join(["python", "tools/bench_finetune_step.py", *sys.argv[1:]]),
            "batch": FACTS,
            "settings": extra,
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    from titan_mem.distributed import exit_process

    main()
    exit_process(0)  # after shutdown(): skip the interpreter teardown (see exit_process)
