"""Shared pieces of tools/bench_*.py: machine description, timed Trainer steps, child-process runs, output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_train_steps(trainer, steps: int, warmup: int) -> dict[str, float]:
    """Median wall time of `steps` optimizer steps after `warmup` (data loading excluded)."""
    times, tokens, info = [], 0, {}
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
    median = statistics.median(times)
    return {
        "step_time_s_median": median,
        "step_time_s_min": min(times),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "final_loss": info.get("loss"),
    }


def run_child(script: str, args: list[str], cwd: Path) -> dict[str, Any]:
    """Run `script --child ...` in a fresh process (own peak memory) and parse its last stdout line."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(cwd)},
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"{Path(script).name}: child {args} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_report(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
