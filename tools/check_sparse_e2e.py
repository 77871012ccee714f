"""Sparse memory finetuning end to end on this machine's device, checked: the first thing a GPU must show.

    python tools/check_sparse_e2e.py [--kernel triton] [--size debug|tiny] [--steps 4] [--root DIR] [--out F]

pretrain (debug model, a few steps, one checkpoint) -> background counts (finetune-shaped batches) ->
sparse finetune (SGD, top-t rows, the chosen lookup kernel: Triton's row-sparse backward on CUDA) ->
check DESIGN invariant 4 on the saved checkpoint: every tensor but the value table is bit-identical to the
base and the table's changed rows are a subset of the rows selected (selected_slots.jsonl) -> full and
LoRA finetuning a few steps from the same base (full moves dense weights, LoRA leaves every base weight
untouched). Each stage is the real CLI in its own process; the JSON report lists each stage's exit code,
seconds and losses, and the checks. Exit code 1 if a stage or a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script on a machine where the repo is not installed

from titan_mem.components.bench import TINY_MODEL  # noqa: E402

CONFIG = str(REPO / "train_configs/debug_model.toml")
# "tiny": components.bench.TINY_MODEL, fast enough for the Triton interpreter (the dry-run device check).
SIZES = {"debug": [], "tiny": TINY_MODEL}
BATCH = ["--training.micro_batch_size=4", "--training.global_batch_size=4"]
FINETUNE = [
    "--data.regime=facts",
    *BATCH,
    "--lr_scheduler.warmup_steps=0",
    "--lr_scheduler.decay_type=constant",
    "--metrics.log_freq=1",
]
MODES = {
    "sparse_finetune": [
        "--training.mode=sparse_finetune",
        "--optimizer.name=sgd",
        "--optimizer.lr=2",
        "--finetune.top_t=10",
        "--training.max_norm=0",
    ],
    "full_finetune": ["--training.mode=full_finetune", "--optimizer.name=adamw", "--optimizer.lr=1e-4"],
    "lora_finetune": [
        "--training.mode=lora_finetune",
        "--finetune.lora_rank=2",
        "--optimizer.name=adamw",
        "--optimizer.lr=0.01",
    ],
}


def _stage(name: str, cmd: list[str], report: dict) -> bool:
    """Run one CLI stage, record exit code, seconds and its last lines; True if it succeeded."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    report["stages"][name] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        report["stages"][name]["tail"] = tail
    print(
        f"{name}: rc {proc.returncode} in {report['stages'][name]['seconds']} s", file=sys.stderr, flush=True
    )
    return proc.returncode == 0


def _losses(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _check_sparse(base: Path, run: Path, steps: int) -> dict:
    """Invariant 4 on the saved checkpoints: only selected value rows changed, nothing else."""
    import torch

    from titan_mem.checkpoint.convert import load_any_model
    from titan_mem.models.memory import is_value_table

    before, _, _ = load_any_model(base)
    after, _, _ = load_any_model(run / "checkpoints" / f"step-{steps}")
    others_changed = [k for k in before if not is_value_table(k) and not torch.equal(before[k], after[k])]
    selected: set[tuple[str, int]] = set()
    for line in (run / "selected_slots.jsonl").read_text().splitlines():
        for layer, rows in json.loads(line)["selected"].items():
            selected |= {(layer, r) for r in rows}
    changed: set[tuple[str, int]] = set()
    for key in before:
        if is_value_table(key):
            rows = torch.ne(before[key], after[key]).any(dim=1).nonzero().flatten().tolist()
            layer = key.removesuffix(".values.weight")
            changed |= {(layer, r) for r in rows}
    return {
        "value_rows_changed": len(changed),
        "value_rows_selected": len(selected),
        "rows_changed_outside_selection": len(changed - selected),
        "other_tensors_changed": others_changed,
        "ok": bool(changed) and not (changed - selected) and not others_changed,
    }


def _check_baselines(base: Path, full: Path, lora: Path, steps: int) -> dict:
    import torch

    from titan_mem.checkpoint.convert import load_any_model
    from titan_mem.models.memory import is_value_table

    before, _, _ = load_any_model(base)
    after_full, _, _ = load_any_model(full / "checkpoints" / f"step-{steps}")
    after_lora, _, _ = load_any_model(lora / "checkpoints" / f"step-{steps}")
    full_moved = [k for k in before if not is_value_table(k) and not torch.equal(before[k], after_full[k])]
    lora_base_moved = [k for k in before if not torch.equal(before[k], after_lora[k])]
    adapters = [k for k in after_lora if k.endswith((".lora_a", ".lora_b"))]
    return {
        "full_dense_tensors_changed": len(full_moved),
        "lora_adapters": len(adapters),
        "lora_base_tensors_changed": lora_base_moved,
        "ok": bool(full_moved) and bool(adapters) and not lora_base_moved,
    }


def run(args: argparse.Namespace) -> dict:
    root = args.root
    size = SIZES[args.size]
    kernel = [f"--training.memory_kernel={args.kernel}"]
    report: dict = {"kernel": args.kernel, "size": args.size, "steps": args.steps, "stages": {}, "checks": {}}
    py = sys.executable
    pretrain = root / "pretrain"
    ok = _stage(
        "pretrain",
        [
            py,
            "-m",
            "titan_mem.train",
            CONFIG,
            *size,
            *BATCH,
            *kernel,
            f"--job.dump_folder={pretrain}",
            f"--training.steps={args.steps}",
            f"--checkpoint.interval={args.steps}",
            "--metrics.log_freq=1",
        ],
        report,
    )
    base = pretrain / "checkpoints" / f"step-{args.steps}"
    ok = ok and _stage(
        "background_counts",
        [
            py,
            str(REPO / "tools/background_counts.py"),
            CONFIG,
            *size,
            *kernel,
            f"--job.dump_folder={pretrain}",
            "--checkpoint",
            str(base),
            "--batch-size",
            "4",
            "--seq-len",
            "32" if size else "128",
            "--batches",
            "8",
        ],
        report,
    )
    runs = {}
    for mode, flags in MODES.items():
        runs[mode] = root / mode
        ok = ok and _stage(
            mode,
            [
                py,
                "-m",
                "titan_mem.train",
                CONFIG,
                *size,
                *FINETUNE,
                *flags,
                *kernel,
                f"--checkpoint.initial_load_path={base}",
                f"--job.dump_folder={runs[mode]}",
                f"--training.steps={args.steps}",
                f"--checkpoint.interval={args.steps}",
            ],
            report,
        )
        if mode in report["stages"]:
            losses = _losses(runs[mode])
            report["stages"][mode]["losses"] = losses
            report["stages"][mode]["finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    if ok:
        report["checks"]["sparse_only_selected_rows"] = _check_sparse(
            base, runs["sparse_finetune"], args.steps
        )
        report["checks"]["full_and_lora"] = _check_baselines(
            base, runs["full_finetune"], runs["lora_finetune"], args.steps
        )
    report["ok"] = (
        ok
        and all(c["ok"] for c in report["checks"].values())
        and all(s.get("finite", True) for s in report["stages"].values())
    )
    return report


def main() -> int:
    from titan_mem.components.bench import machine_info, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="auto", help="training.memory_kernel: auto | torch | triton")
    parser.add_argument("--size", choices=sorted(SIZES), default="debug")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("/tmp/check_sparse_e2e"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.root.exists():
        import shutil

        shutil.rmtree(args.root)  # each check starts from nothing: no resume from an earlier try
    report = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), **run(args)}
    write_report(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
