"""Shared helpers: launch the real trainer (python -m / torchrun / run_train.sh) on tiny settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# triton picks interpreter mode when a kernel is decorated (import time): set it before any test imports
# titan_mem, so the Triton lookup kernels run on CPU tensors in tests/test_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from titan_mem.components.bench import TINY_MODEL  # noqa: E402  (after TRITON_INTERPRET is set)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model and batch small enough for a few steps a second on 2 CPU cores.
TINY = [
    "--model.flavor=debug",
    *TINY_MODEL,
    "--training.micro_batch_size=2",
    "--training.global_batch_size=4",
    "--lr_scheduler.warmup_steps=2",
    "--metrics.log_freq=1",
    "--job.deterministic=true",
]


def sparse_finetune_args(base: Path, run: Path, *extra: str) -> list[str]:
    """The tests' sparse-finetune run: tiny model, one fact per step, SGD lr 2, top-10 rows, 4 steps.
    `extra` comes last, so it overrides any of these."""
    return [
        *TINY,
        f"--job.dump_folder={run}",
        "--training.mode=sparse_finetune",
        f"--checkpoint.initial_load_path={base}",
        "--data.regime=facts",
        "--training.micro_batch_size=4",
        "--training.global_batch_size=4",
        "--training.steps=4",
        "--optimizer.name=sgd",
        "--optimizer.lr=2",
        "--finetune.top_t=10",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
        *extra,
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
    env["PYTHONFAULTHANDLER"] = "1"  # a crash in a child prints every thread's Python stack
    env.update(extra or {})
    return env


def launch(target: list[str], nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `target` (`["-m", module, ...]` or `[script, ...]`) in fresh processes: plain python for one rank,
    torchrun over gloo with a free c10d port for more."""
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        rdzv = [
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        ]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, *target]
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)


def run_trainer(
    args: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    fresh_process: bool = False,
):
    """Run `python -m titan_mem.train ARGS` on `nproc` ranks. One rank with no extra environment runs inside
    this process (`in_process`), unless `fresh_process`: for what only a process boundary shows (the exit of
    `python -m`, signals, what a new interpreter imports)."""
    if nproc == 1 and env is None and not fresh_process:
        from titan_mem import train

        return in_process(lambda: train.main(args), [train.__file__, *args])
    return launch(["-m", "titan_mem.train", *args], nproc, env, timeout)


def in_process(main: Callable[[], int | None], argv: list[str]) -> subprocess.CompletedProcess:
    """Call a command's `main` here as a one-rank launch of `python ARGV` would run it, and return what the
    launch returns: exit code, stdout, stderr. A fresh interpreter costs about 5 s of imports; the command
    itself, a tenth of that at test sizes. sys.argv is `argv` while it runs.

    The state a command changes in its process is put back afterwards: the working directory (REPO, as for a
    launch), torch's deterministic mode, thread count (1, as OMP_NUM_THREADS=1 gives a launch) and RNGs,
    sys.argv, os.environ and the signal handlers. Output the command writes below Python (C++ warnings) is
    not captured."""
    import contextlib
    import gc
    import io
    import random
    import signal

    import numpy as np

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # A forked DataLoader worker that garbage-collects an earlier run's process group or FSDP state crashes
    # (SIGSEGV): that garbage is freed here, in this process, before and after each command.
    gc.collect()
    os.chdir(REPO)
    torch.set_num_threads(1)
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        gc.collect()
    return subprocess.CompletedProcess([sys.executable, *argv], code or 0, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a launched command succeeded, showing the tail of its output if not."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def error_line(
    result: subprocess.CompletedProcess | tuple[int, str],
    *needles: str,
    alone: bool = False,
    last: bool = False,
    code: int | None = 2,
) -> str:
    """The one `error: ...` line a refused command printed (bad input: one line naming the fault, a non-zero
    exit, no traceback), checked to hold every needle. `result`: a finished process or (exit code, stderr).
    alone: stderr holds nothing else; last: it is stderr's final line; code None: any non-zero exit."""
    done = isinstance(result, subprocess.CompletedProcess)
    rc, err = (result.returncode, result.stderr) if done else result
    context = err[-2000:]
    assert (rc != 0) if code is None else (rc == code), f"exit {rc}: {context}"
    assert "Traceback" not in err, context
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, context
    assert not alone or lines == errors, context
    assert not last or lines[-1] == errors[0], context
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module", autouse=True)
def no_process_group_outlives_its_module(request):
    """A module that leaves a process group in the pytest process fails itself: otherwise the next test that
    expects none fails far from the cause (set up first, so it is torn down after the module's own
    fixtures)."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.module.__name__} left a torch.distributed process group initialised")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A tiny 3-step pretraining checkpoint with 8 batches of background counts in its folder."""
    root = tmp_path_factory.mktemp("pretrained")
    args = [*TINY, f"--job.dump_folder={root / 'run'}"]
    ok(run_trainer([*args, "--training.steps=3"]))
    shape = ["--batch-size", "4", "--seq-len", "32"]  # the batch of sparse_finetune_args
    ok(run_tool("background_counts.py", ["train_configs/debug_model.toml", *args, *shape, "--batches", "8"]))
    step = root / "run" / "checkpoints" / "step-3"
    assert (step / "background_counts.safetensors").is_file()
    return step


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny run writing into tmp_path/run."""
    return [*TINY, f"--job.dump_folder={tmp_path / 'run'}"]


def load_model_tensors(step_dir: Path) -> dict:
    """Model tensors of a DCP checkpoint, consolidated in this process (no process group needed). A sparse
    checkpoint is read as its base (DCP's own reader) with the patch file's finetuned rows put in."""
    import tempfile

    from safetensors import safe_open
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    patch = Path(step_dir) / "patch.safetensors"
    if patch.is_file():
        with safe_open(str(patch), framework="pt") as f:
            base = Path(f.metadata()["base"])
            stored = {k: f.get_tensor(k) for k in f.keys()}
        model = load_model_tensors(base)
        for key, rows in stored.items():
            if key.startswith("rows/"):
                name = key[len("rows/") :]
                model[name][rows] = stored[f"finetuned/{name}"]
        return model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(step_dir), str(out))
        state = torch.load(out, weights_only=False)
    return dict(state["model"])


def run_tool(
    script: str,
    args: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    fresh_process: bool = False,
):
    """Run tools/<script> on `nproc` ranks; one rank in this process as `run_trainer` does (the tools are thin
    CLIs whose `main()` reads sys.argv and returns the exit code)."""
    path = REPO / "tools" / script
    if nproc == 1 and env is None and not fresh_process:
        return in_process(_tool_module(path).main, [str(path), *args])
    return launch([str(path), *args], nproc, env, timeout)


_TOOLS: dict[Path, object] = {}


def _tool_module(path: Path):
    """tools/<script> imported once as a module (its `__main__` block, which ends the process, not run)."""
    if path not in _TOOLS:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"tools_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[path] = module
    return _TOOLS[path]


def _one_rank_worker(rank: int, fn, args: tuple, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from titan_mem.distributed import exit_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        torch.save(fn(*args), out)
    finally:
        dist.destroy_process_group()
    exit_process(0)  # skip interpreter teardown, which can abort after gloo use (see exit_process)


def run_one_rank(fn, tmp_path: Path, *args):
    """fn(*args) in a fresh spawned process holding a 1-rank gloo group (FSDP2 needs one), returning its
    result: the test process never holds a process group, and a gloo teardown abort cannot end pytest."""
    import torch.multiprocessing as mp

    out = tmp_path / "one_rank_result.pt"
    mp.spawn(_one_rank_worker, args=(fn, args, str(tmp_path / "init"), str(out)), nprocs=1, join=True)
    return torch.load(out, weights_only=False)
