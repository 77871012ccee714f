"""The tests' launchers (launchers.py) run a command as a fresh launch would: a one-rank run inside pytest
and a fresh `python -m titan_mem.train` give the same losses bit for bit, forked ranks and torchrun's
workers too, and a run inside pytest leaves the process as it found it."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from conftest import TINY, losses, ok, run_trainer


def _args(run) -> list[str]:
    return [*TINY, f"--job.dump_folder={run}", "--training.steps=3", "--checkpoint.enable=false"]


def _process_state() -> tuple:
    """What a command may change in its process: cwd, threads, deterministic mode, SIGTERM handler, RNG."""
    return (
        os.getcwd(),
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        signal.getsignal(signal.SIGTERM),
        torch.get_rng_state(),
    )


def test_in_process_run_equals_a_fresh_interpreter_and_restores_the_process(tmp_path):
    state = _process_state()
    here = ok(run_trainer(_args(tmp_path / "here")))
    after = _process_state()
    assert after[:4] == state[:4] and torch.equal(after[4], state[4])
    assert not dist.is_initialized()
    fresh = ok(run_trainer(_args(tmp_path / "fresh"), fresh_process=True))
    assert "model debug" in here.stdout and "model debug" in fresh.stdout
    assert losses(tmp_path / "here") == losses(tmp_path / "fresh")
    assert len(set(losses(tmp_path / "here").values())) == 3


def test_forked_ranks_equal_torchrun_workers(tmp_path):
    forked = ok(run_trainer(_args(tmp_path / "forked"), nproc=2))
    torchrun = ok(run_trainer(_args(tmp_path / "torchrun"), nproc=2, fresh_process=True))
    assert "2 rank(s)" in forked.stdout and "2 rank(s)" in torchrun.stdout
    assert losses(tmp_path / "forked") == losses(tmp_path / "torchrun")
    assert sorted(losses(tmp_path / "forked")) == [1, 2, 3]


def test_failed_ranks_fail_the_forked_run_with_their_error_lines(tmp_path):
    missing = tmp_path / "no_such_run" / "step-3"
    finetune = ["--training.mode=full_finetune", f"--checkpoint.initial_load_path={missing}"]
    proc = run_trainer([*_args(tmp_path / "ft"), *finetune], nproc=2)
    assert proc.returncode == 2  # the rank's own exit code, not a launcher's
    refusal = f"error: checkpoint.initial_load_path: {missing}: no DCP checkpoint there"
    assert proc.stderr.count(refusal) == 2, proc.stderr  # each rank's stderr, in rank order
