"""A long-running command stopped by Ctrl-C (SIGINT) or a scheduler (SIGTERM) ends with one line, exit code
130 / 143, no output file (complete or partial) and no process of its group left behind (data-loader
workers included). The signal is handled once, at the command-line boundary (titan_mem/cli.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, _env

from titan_mem.cli import run_cli


def _interrupt(cmd: list[str], sig: int, ready: str, timeout: float = 240) -> tuple[int, str]:
    """Start `python CMD` in its own process group, send `sig` once its stderr shows `ready`; (rc, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, *cmd], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    seen, deadline = "", time.monotonic() + timeout
    while ready not in seen:
        char = proc.stderr.read(1)
        assert char and time.monotonic() < deadline, f"never showed {ready!r}: {seen[-2000:]}"
        seen += char
    proc.send_signal(sig)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=60)
    for _ in range(100):  # the group's other processes (data-loader workers) go with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the command's group outlived it")
    return rc, seen + rest


def _one_interrupt_line(err: str, sig: int) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    name = signal.Signals(sig).name
    assert lines == [f"error: interrupted by {name}; no output of this command was completed"]
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_background_counts_stop_cleanly(pretrained, tmp_path, sig):
    out = tmp_path / "counts.safetensors"
    shape = ["--batch-size", "4", "--seq-len", "32", "--batches", "4000"]
    cmd = ["tools/background_counts.py", "train_configs/debug_model.toml", *TINY, *shape,
           "--checkpoint", str(pretrained), "--out", str(out)]  # fmt: skip
    rc, err = _interrupt(cmd, sig, ready="background counts: ")
    assert rc == 128 + sig
    _one_interrupt_line(err, sig)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_evaluation_stops_cleanly(pretrained, tmp_path, sig):
    out, predictions = tmp_path / "results.json", tmp_path / "predictions.jsonl"
    cmd = ["tools/evaluate.py", "--checkpoint", str(pretrained), "--tasks", "synthetic_qa", "--limit", "400",
           "--batch-size", "2", "--out", str(out), "--predictions", str(predictions)]  # fmt: skip
    rc, err = _interrupt(cmd, sig, ready="| 1/")
    assert rc == 128 + sig
    _one_interrupt_line(err, sig)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_boundary_turns_each_signal_into_its_exit_code(capsys):
    """In-process: what every command (train, tools, study) does on a signal, and that it restores the
    SIGTERM handler it found."""
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert run_cli(lambda sig=sig: (os.kill(os.getpid(), sig), time.sleep(30))) == 128 + sig
        _one_interrupt_line(capsys.readouterr().err, sig)
    assert signal.getsignal(signal.SIGTERM) is before
