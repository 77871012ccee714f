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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The smallest model that still has every part (attention, SwiGLU, a product-key memory layer) and a
# synthetic corpus to match: a few steps a second on 2 CPU cores, also through the Triton interpreter. The
# tests' runs and the device check's dry run use it (CLI overrides on top of train_configs/debug_model.toml).
TINY_MODEL = [
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.ffn_hidden_dim=128",
    "--model.memory_layers=1",
    "--model.memory_n_keys=16",
    "--model.memory_heads=2",
    "--model.memory_topk=4",
    "--model.memory_k_dim=16",
    "--model.memory_v_dim=64",
    "--training.seq_len=32",
    "--data.synthetic_known_people=50",
    "--data.synthetic_new_people=10",
]


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


def allocations(fn: Callable[[], Any]) -> dict[str, int]:
    """Bytes that torch allocates while `fn()` runs, on any device: {"total_bytes", "largest_bytes",
    "count"}.

    Counted from the profiler's memory events (`profile_memory=True`), which see every tensor allocation
    on CPU as on CUDA, so a table-sized cast or gradient shows up as one allocation of M x D x dtype bytes
    even on a machine without a GPU. Peak-memory counters cannot do that on CPU (there are none).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    sizes = []
    for event in prof.events():
        # An op's *self* usage is what it allocated itself (children counted in theirs); frees are < 0.
        for used in (event.self_cpu_memory_usage, event.self_device_memory_usage):
            if used > 0:
                sizes.append(int(used))
    return {"total_bytes": sum(sizes), "largest_bytes": max(sizes, default=0), "count": len(sizes)}


def reset_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux: `/proc/self/clear_refs` 5). A child started from a
    large parent inherits the parent's high-water mark through fork and exec (ru_maxrss and VmHWM both), so
    without this a child would report its parent's size. False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB since start or `reset_peak_rss` (VmHWM; ru_maxrss
    elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
