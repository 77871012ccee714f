"""Trainer end to end on one process: learning, checkpoints, exact resume, dry run, crash-safe saves."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, _env, losses, read_metrics, run_trainer
from conftest import ok as _ok

from titan_mem.checkpoint import step_dirs


@pytest.mark.heavy
def test_run_train_sh_debug_default_learns_and_checkpoints(tmp_path):
    """./run_train.sh with the default config (shortened): loss falls clearly, checkpoints land."""
    run = tmp_path / "debug"
    proc = subprocess.run(
        [
            "./run_train.sh",
            f"--job.dump_folder={run}",
            "--training.steps=80",
            "--metrics.log_freq=10",
            "--checkpoint.interval=40",
        ],
        cwd=REPO,
        env=_env({"NGPU": "1"}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    _ok(proc)
    records = read_metrics(run)
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert sorted(step_dirs(run / "checkpoints")) == [40, 80]
    assert (run / "config.json").is_file()
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in records)


def test_resume_is_exact_single_rank(tiny, tmp_path):
    # Constant lr after warmup: the first launch's shorter `training.steps` must not change the schedule.
    tiny = [*tiny, "--lr_scheduler.decay_type=constant"]
    straight = tmp_path / "straight"
    _ok(
        run_trainer(
            [*tiny, f"--job.dump_folder={straight}", "--training.steps=6", "--checkpoint.interval=100"]
        )
    )
    # The first launch writes step 2 in the background (async_mode) while step 3 trains; the second
    # resumes from that one, so an asynchronous save that copied too late or wrote too little fails here.
    split = tmp_path / "split"
    background = ["--checkpoint.async_mode=async", "--checkpoint.interval=2"]
    proc = _ok(run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=3", *background]))
    assert "saving checkpoint" in proc.stdout and sorted(step_dirs(split / "checkpoints")) == [2, 3]
    proc = _ok(
        run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=6", "--checkpoint.load_step=2"])
    )
    assert re.search(r"resumed from .*step-2 at step 2", proc.stdout)
    a, b = losses(straight), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit for bit


def test_keep_latest_k_and_load_step(tiny, tmp_path):
    run = tmp_path / "run"
    _ok(run_trainer([*tiny, "--training.steps=4", "--checkpoint.interval=1", "--checkpoint.keep_latest_k=2"]))
    assert sorted(step_dirs(run / "checkpoints")) == [3, 4]
    proc = _ok(
        run_trainer([*tiny, "--training.steps=5", "--checkpoint.load_step=3", "--checkpoint.interval=100"])
    )
    assert re.search(r"resumed from .*step-3 at step 3", proc.stdout)


@pytest.mark.parametrize("fault", ["before_metadata", "before_rename"])
def test_sigkill_during_save_leaves_previous_checkpoint_usable(tiny, tmp_path, fault):
    run = tmp_path / "run"
    _ok(run_trainer([*tiny, "--training.steps=2", "--checkpoint.interval=2"]))
    killed = run_trainer(
        [*tiny, "--training.steps=4", "--checkpoint.interval=2"], env={"TITAN_MEM_TEST_KILL_IN_SAVE": fault}
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step-4.partial").is_dir()  # the interrupted save, never renamed
    assert any((ckpts / "step-4.partial").glob("*.distcp"))  # tensor data was being written
    assert (ckpts / "step-4.partial" / ".metadata").exists() == (fault == "before_rename")
    assert sorted(step_dirs(ckpts)) == [2]
    # what a crash in a purge leaves: a renamed folder, or (older titan_mem) one without its .metadata
    for leftover in ("step-0.deleting", "step-1"):
        (ckpts / leftover).mkdir()
        (ckpts / leftover / "__0_0.distcp").write_bytes(b"x" * 100)
    proc = _ok(run_trainer([*tiny, "--training.steps=4", "--checkpoint.interval=2"]))
    assert re.search(r"resumed from .*step-2 at step 2", proc.stdout)
    for leftover in ("step-4.partial", "step-0.deleting", "step-1"):
        assert re.search(rf"removed .*{leftover} \(an unfinished save or delete", proc.stdout), leftover
        assert not (ckpts / leftover).exists()
    assert sorted(step_dirs(ckpts)) == [2, 4]
    assert not (ckpts / "step-4.partial").exists()
    # The killed run had logged steps 3 and 4; the resumed run logs them again, and only once.
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_dry_run_pretrain_1b_prints_paper_model_counts():
    proc = _ok(run_trainer(["train_configs/pretrain_1b.toml", "--job.dry_run"], env={"WORLD_SIZE": "64"}))
    out = proc.stdout
    counts = {
        m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"params (\w+)\s+([\d,]+)", out)
    }
    assert counts["memory_values"] == 1_073_741_824  # 1024^2 slots x 1024-dim values
    # 22 blocks of dim 2048: 21 SwiGLU FFNs (8192) + attention; block 12 is the memory layer.
    d, f, vocab = 2048, 8192, 100_352
    mem_dense = d * 4 * 512 + 4 * 1024 * 512 + 512 + 2 * d * 1024
    dense = 22 * (4 * d * d + 2 * d) + 21 * 3 * d * f + mem_dense + d
    assert counts["dense"] == dense
    assert counts["embedding"] == 2 * vocab * d
    assert counts["total"] == dense + 2 * vocab * d + 1_073_741_824
    assert counts["active_per_token"] == dense + vocab * d + 4 * 32 * 1024
    assert "vocab 100352 (tokenizer 100278)" in out
    assert "data-parallel ranks 64 (FSDP groups of 64), grad accumulation 2" in out
    est = {m.group(1): float(m.group(2)) for m in re.finditer(r"est. per-GPU (\w+)\s+([\d.]+)", out)}
    # Per rank of 64, micro-batch 4 x 2048 tokens: the 1M x 1024 table is a 64-way column shard whose fp32
    # gradient is remade every micro-batch; the logits [8192, 100352] peak at 18 bytes each in the loss.
    assert est["value_table_buffers_gib"] == pytest.approx(2**20 * 1024 * 4 / 64 / 2**30, abs=0.01)
    assert est["logits_gib"] == pytest.approx(4 * 2048 * vocab * 18 / 2**30, abs=0.01)
    parts = [v for k, v in est.items() if k != "total_gib"]
    assert est["total_gib"] == pytest.approx(sum(parts), abs=0.05)


def test_nan_loss_stops_without_saving(tiny, tmp_path):
    run = tmp_path / "run"
    proc = run_trainer(
        [
            *tiny,
            "--training.steps=8",
            "--checkpoint.interval=1",
            "--optimizer.lr=1e30",
            "--training.max_norm=0",
            "--lr_scheduler.warmup_steps=0",
        ]
    )
    assert proc.returncode == 2
    pattern = r"^error: step \d+: (loss|gradient norm) is (nan|inf)"  # whichever is met first stops the run
    assert re.search(pattern, proc.stderr, re.M), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    bad_step = int(re.search(r"error: step (\d+)", proc.stderr).group(1))
    assert all(s < bad_step for s in step_dirs(run / "checkpoints"))


def test_activation_checkpointing_and_tied_embeddings_train_the_same(tiny, tmp_path):
    """Recomputing blocks in backward changes memory, not numbers; tied embeddings train too."""
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    common = [*tiny, "--training.steps=3", "--checkpoint.enable=false"]
    _ok(run_trainer([*common, f"--job.dump_folder={plain}"]))
    _ok(run_trainer([*common, f"--job.dump_folder={ac}", "--training.activation_checkpoint=full"]))
    a, b = losses(plain), losses(ac)
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    tied = tmp_path / "tied"
    _ok(run_trainer([*common, f"--job.dump_folder={tied}", "--model.tie_embeddings=true"]))
    assert len(losses(tied)) == 3


def test_compiled_blocks_match_eager(tiny, tmp_path):
    """Per-block torch.compile (inductor on CPU) changes speed, not the loss curve."""
    common = [*tiny, "--training.steps=3", "--checkpoint.enable=false"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _ok(run_trainer([*common, f"--job.dump_folder={eager}"]))
    _ok(run_trainer([*common, f"--job.dump_folder={compiled}", "--training.compile=true"]))
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-4 for s in a), (a, b)


def test_initial_load_full_state_continues_another_run(tiny, tmp_path):
    """initial_load_model_only=false: a new folder continues another run's step, optimizer and data."""
    const = [*tiny, "--lr_scheduler.decay_type=constant"]
    straight = tmp_path / "straight"
    _ok(
        run_trainer(
            [*const, f"--job.dump_folder={straight}", "--training.steps=4", "--checkpoint.interval=2"]
        )
    )
    other = tmp_path / "other"
    proc = _ok(
        run_trainer(
            [
                *const,
                f"--job.dump_folder={other}",
                "--training.steps=4",
                f"--checkpoint.initial_load_path={straight / 'checkpoints' / 'step-2'}",
                "--checkpoint.initial_load_model_only=false",
            ]
        )
    )
    assert "at step 2" in proc.stdout
    a, b = losses(straight), losses(other)
    assert sorted(b) == [3, 4] and [a[3], a[4]] == [b[3], b[4]]


@pytest.mark.heavy
def test_run_train_sh_on_a_fresh_machine_installs_into_venv(tmp_path):
    """The README's first command where `python3` lacks the project's packages: run_train.sh makes .venv."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    # `python3` on PATH: a bare interpreter without torch or the project (a venv without site packages).
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "python3"  # a script, not a symlink: the venv is found from the path it is run by
    shim.write_text(f'#!/bin/sh\nexec "{bare / "bin" / "python3"}" "$@"\n')
    shim.chmod(0o755)
    env = _env({"NGPU": "1", "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"})
    env.pop("PYTHONPATH")
    env.pop("PYTHON", None)
    proc = subprocess.run(
        ["./run_train.sh", "--training.steps=2", "--checkpoint.enable=false", "--job.dump_folder=outputs/t"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    _ok(proc)
    assert "installing titan_mem into .venv" in proc.stderr
    assert (clone / ".venv" / "bin" / "python").exists()
    assert [r["step"] for r in read_metrics(clone / "outputs" / "t")] == [1, 2]
