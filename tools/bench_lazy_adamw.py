"""Benchmark: lazy row-sparse AdamW vs dense AdamW for the memory value table (optimizer.memory_update).

Two measurements in one invocation, printed as one JSON object (`--out` also writes it):
  loss       the debug model pretrained `--steps` steps with dense and with lazy value updates, same seed
             and data, at the config's batch and at a small one (fewer rows read per step): mean training
             loss over the last `--tail` steps, the lazy - dense difference, the fraction of value rows a
             step read, and step time. Each run is a fresh child process.
  optimizer  one optimizer step on an [M, D] fp32 table (on the GPU if there is one) with a fraction of its
             rows read: dense AdamW (dense gradient, torch's default foreach) vs LazyRowAdamW (row-sparse
             gradient), median wall time.
    python tools/bench_lazy_adamw.py [--steps 200] [--tail 20] [--table 262144x256] [--out FILE] [--k=v]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCHES = {  # name -> overrides; "small" reads a much smaller share of the 4096 rows per step
    "config": [],
    "small": ["--training.global_batch_size=2", "--training.micro_batch_size=2", "--training.seq_len=32"],
}


def _child(update: str, batch: str, steps: int, extra: list[str]) -> dict:
    from titan_mem.config import parse_args
    from titan_mem.distributed import shutdown
    from titan_mem.train import Trainer

    cfg = parse_args(
        [
            str(REPO / "train_configs/debug_model.toml"),
            f"--job.dump_folder={REPO / 'outputs' / 'bench_lazy_adamw' / f'{batch}-{update}'}",
            "--checkpoint.enable=false",
            f"--training.steps={steps}",
            f"--optimizer.memory_update={update}",
            *BATCHES[batch],
            *extra,
        ]
    )
    trainer = Trainer(cfg)
    losses, read, times = [], [], []
    for _ in range(steps):
        batches = trainer._next_batches()
        t0 = time.perf_counter()
        info = trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
        trainer.step += 1
        losses.append(info["loss"])
        if "value_rows_read" in info:
            read.append(info["value_rows_read"])
    shutdown()
    return {
        "losses": losses,
        "value_rows_read_mean": statistics.mean(read) if read else None,
        "step_time_s_median": statistics.median(times),
    }


def _loss_comparison(steps: int, tail: int, extra: list[str]) -> dict:
    from titan_mem.components.bench import run_child

    out = {}
    for batch in BATCHES:
        runs = {}
        for update in ("dense", "lazy"):
            args = ["--child", update, "--batch", batch, "--steps", str(steps), *extra]
            runs[update] = run_child(__file__, args, REPO)
        tails = {u: statistics.mean(r["losses"][-tail:]) for u, r in runs.items()}
        out[batch] = {
            "overrides": BATCHES[batch],
            "value_rows_read_mean": runs["lazy"]["value_rows_read_mean"],
            "tail_loss_dense": tails["dense"],
            "tail_loss_lazy": tails["lazy"],
            "tail_loss_lazy_minus_dense": tails["lazy"] - tails["dense"],
            "max_abs_step_loss_difference": max(
                abs(a - b) for a, b in zip(runs["dense"]["losses"], runs["lazy"]["losses"], strict=True)
            ),
            "step_time_s_median": {u: r["step_time_s_median"] for u, r in runs.items()},
            "losses_every_10": {u: r["losses"][::10] for u, r in runs.items()},
        }
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(
    param: torch.nn.Parameter, grad: torch.Tensor, opt: torch.optim.Optimizer, repeat: int
) -> float:
    """Median wall time of opt.step() with `grad` in place (one warm-up step allocates the state)."""
    times = []
    for i in range(repeat + 1):
        param.grad = grad
        _sync(param.device)
        t0 = time.perf_counter()
        opt.step()
        _sync(param.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _optimizer_step(rows: int, dim: int, fractions: list[float], repeat: int) -> list[dict]:
    from titan_mem.components.lazy_adamw import LazyRowAdamW

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for fraction in fractions:
        g = torch.Generator().manual_seed(0)
        n_read = max(1, int(rows * fraction))
        read = torch.randperm(rows, generator=g)[:n_read].sort().values.to(dev)
        grad_rows = torch.randn(n_read, dim, generator=g).to(dev)
        dense_p = torch.nn.Parameter(torch.zeros(rows, dim, device=dev))
        lazy_p = torch.nn.Parameter(torch.zeros(rows, dim, device=dev))
        dense_grad = torch.zeros(rows, dim, device=dev)
        dense_grad[read] = grad_rows
        sparse_grad = torch.sparse_coo_tensor(
            read.unsqueeze(0), grad_rows, (rows, dim), is_coalesced=True, check_invariants=False
        )
        t_dense = _time_steps(dense_p, dense_grad, torch.optim.AdamW([dense_p], lr=1e-3), repeat)
        t_lazy = _time_steps(lazy_p, sparse_grad, LazyRowAdamW([lazy_p], [lazy_p], lr=1e-3), repeat)
        out.append(
            {
                "device": str(dev),
                "fraction_read": fraction,
                "dense_adamw_s": t_dense,
                "lazy_adamw_s": t_lazy,
                "lazy_over_dense": t_lazy / t_dense,
            }
        )
    return out


def main() -> None:
    from titan_mem.components.bench import machine_info, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tail", type=int, default=20, help="steps averaged at the end of each run")
    parser.add_argument("--table", default="262144x256", help="MxD of the optimizer-step timing")
    parser.add_argument("--fractions", default="0.01,0.1,0.9", help="shares of rows read, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", choices=sorted(BATCHES), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.child:
        import json

        print(json.dumps(_child(args.child, args.batch, args.steps, extra)))
        return
    if not 0 < args.tail <= args.steps:
        parser.error(f"--tail: must be in [1, --steps={args.steps}]; got {args.tail}")
    try:
        rows, dim = (int(x) for x in args.table.lower().split("x"))
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error(f"--table/--fractions: expected MxD and comma-separated numbers; got {args.table!r}")
    report = {
        "benchmark": "lazy_adamw",
        "machine": machine_info(),
        "command": "python tools/bench_lazy_adamw.py "
        + " ".join(
            f"--{k}={v}" for k, v in (("steps", args.steps), ("tail", args.tail), ("table", args.table))
        ),
        "overrides": extra,
        "optimizer_step": {
            "table": [rows, dim],
            "results": _optimizer_step(rows, dim, fractions, args.repeat),
        },
    }
    if not args.skip_loss:
        report["loss"] = _loss_comparison(args.steps, args.tail, extra)
    write_report(report, args.out)


if __name__ == "__main__":
    from titan_mem.distributed import exit_process

    main()
    exit_process(0)
