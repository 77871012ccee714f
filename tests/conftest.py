"""Shared helpers: launch the real trainer (python -m / torchrun / run_train.sh) on tiny settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model and batch small enough for a few steps a second on 2 CPU cores.
TINY = [
    "--model.flavor=debug",
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
    "--training.micro_batch_size=2",
    "--training.global_batch_size=4",
    "--lr_scheduler.warmup_steps=2",
    "--metrics.log_freq=1",
    "--job.deterministic=true",
    "--data.synthetic_known_people=50",
    "--data.synthetic_new_people=10",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run_trainer(args: list[str], nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `titan_mem.train` in fresh processes: plain python for 1 rank, torchrun (gloo) for more."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "titan_mem.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            "-m",
            "titan_mem.train",
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny run writing into tmp_path/run."""
    return [*TINY, f"--job.dump_folder={tmp_path / 'run'}"]


def load_model_tensors(step_dir: Path) -> dict:
    """Model tensors of a DCP checkpoint, consolidated in this process (no process group needed)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(step_dir), str(out))
        state = torch.load(out, weights_only=False)
    return dict(state["model"])


def run_tool(
    script: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300
):
    """Run tools/<script> in a fresh process (torchrun over gloo when nproc > 1)."""
    path = str(REPO / "tools" / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            path,
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
