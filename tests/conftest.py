"""Shared helpers: run the real trainer and tools on tiny settings (how: launchers.py), read their output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

# triton picks interpreter mode when a kernel is decorated (import time): set it before any test imports
# titan_mem, so the Triton lookup kernels run on CPU tensors in tests/integration/test_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import launchers  # noqa: E402
from launchers import REPO, _env, free_port, launch, run_one_rank  # noqa: E402, F401  (the tests' imports)

from titan_mem.components.bench import TINY_MODEL  # noqa: E402  (after TRITON_INTERPRET is set)

SHARED_DATA = REPO.parent / "shared" / "data"
# SmolLM2-135M-Instruct as an HF folder, where tools/get_model.sh smollm2-135m puts it.
REAL_MODEL = Path(os.environ.get("TITAN_MEM_MODELS", REPO / "outputs" / "models")) / "smollm2-135m"

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


def tiny_transformer(vocab_size: int, *, n_heads: int = 2, max_seq_len: int = 64):
    """A two-block model with a memory layer at block 1 (8x8 slots), seeded, built in-process in
    milliseconds: for tests of what a model computes, not of how a run trains it."""
    from titan_mem.models.args import MemoryArgs, ModelArgs
    from titan_mem.models.transformer import Transformer

    args = ModelArgs(
        dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=2, ffn_hidden_dim=64, vocab_size=vocab_size,
        max_seq_len=max_seq_len, memory=MemoryArgs(layers=[1], n_keys=8, heads=2, topk=2, k_dim=8, v_dim=32),
    )  # fmt: skip
    args.validate()
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return model


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


def run_trainer(
    args: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    fresh_process: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m titan_mem.train ARGS` on `nproc` ranks: here (one rank) or forked from here (more), see
    launchers.py; in fresh interpreters (python, torchrun) when `env` adds variables or `fresh_process` asks
    for what only a process boundary shows."""
    if env is None and not fresh_process:
        from titan_mem import train

        return launchers.run(lambda: train.main(args), [train.__file__, *args], nproc, timeout)
    return launch(["-m", "titan_mem.train", *args], nproc, env, timeout)


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


# The tiny model without memory layers: the dense model the HF tests export and the retrofit tests retrofit.
TINY_DENSE = [
    "--model.flavor=debug_dense",
    *[a for a in TINY if not a.startswith(("--model.memory", "--model.flavor"))],
]


@pytest.fixture(scope="session")
def dense_hf(tmp_path_factory) -> tuple[Path, Path]:
    """A dense model titan_mem pretrained itself (3 steps): its checkpoint and its HF export (to-hf)."""
    root = tmp_path_factory.mktemp("dense")
    ok(run_trainer([*TINY_DENSE, f"--job.dump_folder={root / 'run'}", "--training.steps=3"]))
    step = root / "run" / "checkpoints" / "step-3"
    ok(run_tool("convert_checkpoint.py", ["to-hf", str(step), str(root / "hf")]))
    return step, root / "hf"


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
    script: str, args: list[str], nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """tools/<script> on `nproc` ranks, launched as `run_trainer` launches the trainer."""
    return _run_script(REPO / "tools" / script, args, nproc, env, timeout)


def run_dist_script(script: str, nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    """tests/dist_scripts/<script> (a test body that needs its own ranks) on `nproc` ranks, as `run_tool`."""
    return _run_script(REPO / "tests" / "dist_scripts" / script, args, nproc, None, 300)


def _run_script(path: Path, args: list[str], nproc: int, env: dict[str, str] | None, timeout: int):
    """A script's `main()` here or in forked ranks; in fresh interpreters when `env` adds variables."""
    if env is None:
        return launchers.run(launchers.script_main(path), [str(path), *args], nproc, timeout)
    return launch([str(path), *args], nproc, env, timeout)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `heavy` (a minute or more on 2 cores) run first: pytest-xdist hands tests out in this
    order, so the longest start while the rest fill in around them instead of one finishing alone at the
    end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: the rest keep order
