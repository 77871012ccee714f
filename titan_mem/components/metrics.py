"""Step metrics: throughput, MFU, memory; printed on the log rank and appended to <run>/metrics.jsonl."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak per device (vendor datasheets, without sparsity).
_PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where unknown (CPU): MFU is then not reported."""
    return _by_device_name(device, _PEAK_BF16_FLOPS)


# Peak memory bandwidth per device, bytes/s (vendor datasheets): the memory lookup is bandwidth-bound
# (DESIGN: 256 KiB of value rows a token at the 1B shapes), so kernels are judged in GB/s against this.
_PEAK_HBM_BYTES_PER_S = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM
    "A100": 2.039e12,  # 80 GB SXM
    "L40S": 0.864e12,
    "A10G": 0.6e12,
}


def _by_device_name(device: torch.device, table: dict[str, float]) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table.items() if key in name), None)


def peak_memory_bandwidth(device: torch.device) -> float | None:
    """Peak HBM bytes/s of `device`, or None where unknown (CPU)."""
    return _by_device_name(device, _PEAK_HBM_BYTES_PER_S)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 1024**2


def drop_records_after(path: Path, step: int) -> int:
    """Remove JSON-lines records with `step` > `step` (atomic rewrite); returns how many were dropped.

    A run that crashed after logging step 130 and resumes from the step-100 checkpoint logs 101..130 again;
    without this the file would hold those steps twice. A fresh run (step 0) starts an empty log.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, AttributeError):
            later = False  # not ours to judge: keep it
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


class MetricsLogger:
    """Writes one JSON object per logged step; only the log rank writes."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(run_dir / "tb"))
                except ImportError:
                    print("metrics.tensorboard: tensorboard is not installed; skipping", file=sys.stderr)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {step:>6}"]
        for key, value in values.items():
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            elif value is not None:
                parts.append(f"{key} {value}")
        print("  ".join(parts), flush=True)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
