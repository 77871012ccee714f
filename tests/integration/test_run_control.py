"""A run and its dump folder (components/run_control.py): one live run per folder (a stale lock is taken
over), SIGTERM/SIGUSR1 save at the next step and exit 0, unfinished saves removed, resumed step checks."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, _env, error_line, losses, run_trainer
from conftest import ok as _ok

from titan_mem.checkpoint import step_dirs
from titan_mem.components.run_control import StopSignals


def _one_error_line(proc, needle: str) -> None:
    error_line(proc, needle, alone=True)


def test_a_live_run_locks_its_dump_folder_and_a_dead_one_does_not(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".run.lock"
    with open(lock, "w") as held:
        held.write("pid 4242 on somehost since 2026-11-23T00:00:00\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run holds it
        proc = run_trainer([*tiny, "--training.steps=1"])
        _one_error_line(proc, f"{lock}: another run is using this dump folder (pid 4242 on somehost")
        assert not (run / "checkpoints").exists()  # refused before anything was written
    # The holder is gone (its flock went with it); the file stays behind and is simply taken over.
    _ok(run_trainer([*tiny, "--training.steps=1"]))
    assert "pid 4242" not in lock.read_text()  # rewritten by the run that took it over


def test_both_stop_signals_are_caught_and_handlers_restored():
    stop, before = StopSignals(), signal.getsignal(signal.SIGUSR1)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("launcher", ["python", "run_train.sh"])
def test_stop_signal_saves_the_step_and_the_run_resumes(tiny, tmp_path, launcher):
    """SIGTERM to a one-process run; SIGUSR1 to torchrun (run_train.sh, 2 ranks), which forwards it to the
    workers (--signals-to-handle): what SLURM's `--signal=B:USR1@T` delivers through srun. The workers save
    the step they reach and exit 0; torchrun itself then exits 1 with its own SignalException report."""
    run = tmp_path / "run"
    args = [*tiny, "--training.steps=1000", "--checkpoint.interval=1000", "--metrics.log_freq=1"]
    if launcher == "python":
        cmd, env, sig, nproc = [sys.executable, "-m", "titan_mem.train", *args], _env(), signal.SIGTERM, 1
    else:
        cmd = ["./run_train.sh", "train_configs/debug_model.toml", *args]
        env, sig, nproc = _env({"NGPU": "2"}), signal.SIGUSR1, 2
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step      2 " in line:  # training is under way
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (0 if launcher == "python" else 1), err[-2000:]
    (stopped,) = step_dirs(run / "checkpoints")
    assert 2 <= stopped < 1000
    assert f"stop signal received: saved step {stopped}" in out, out[-2000:]
    assert max(losses(run)) == stopped
    resumed = _ok(run_trainer([*tiny, f"--training.steps={stopped + 1}"], nproc=nproc))
    assert f"at step {stopped}" in resumed.stdout and max(losses(run)) == stopped + 1


def test_resuming_past_training_steps_is_an_error(tiny, tmp_path):
    _ok(run_trainer([*tiny, "--training.steps=2"]))
    proc = run_trainer([*tiny, "--training.steps=1"])
    _one_error_line(proc, "training.steps=1 is below the step 2 of ")


def test_slurm_script_saves_and_requeues_on_usr1(tiny, tmp_path):
    """tools/slurm_train.sbatch as SLURM runs it at `--signal=B:USR1@T`: SIGUSR1 to the batch shell. SLURM
    itself is not here, so `srun` and `scontrol` are two-line stand-ins on PATH (srun runs its command on
    this node; scontrol records the requeue); the trap, the wait loop and the requeue are the script's."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit=1
    requeued = tmp_path / "requeued"
    record = f'if [[ "$1" == requeue ]]; then echo "$2" > {requeued}; else echo localhost; fi'
    (shims / "scontrol").write_text(f"#!/usr/bin/env bash\n{record}\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    run = tmp_path / "run"
    slurm = {
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
    }
    env = _env({**slurm, "NGPU": "1", "PATH": f"{shims}:{os.environ['PATH']}"})
    args = [*tiny, "--training.steps=1000", "--checkpoint.interval=1000", "--metrics.log_freq=1"]
    proc = subprocess.Popen(
        ["bash", "tools/slurm_train.sbatch", "train_configs/debug_model.toml", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step      2 "):
            proc.send_signal(signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert requeued.read_text().strip() == "77"
    (stopped,) = step_dirs(run / "checkpoints")
    assert f"stop signal received: saved step {stopped}" in out and "then requeueing" in err
