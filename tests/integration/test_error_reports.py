"""What a command prints when it fails: a user error is one line (exit 2); anything else is one line naming
the file that keeps its traceback (exit 1), so the first GPU failure (a ValueError or OSError from deep
inside torch, triton or NCCL) can be diagnosed. In-process: `train.main` is what `python -m` runs."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import TINY, error_line

from titan_mem import train
from titan_mem.config import parse_args
from titan_mem.data.tokenizer import padded_vocab_size
from titan_mem.errors import TRACEBACK_ENV, is_user_error


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def deep_library_failure(*args, **kwargs):
    """Stands in for torch/NCCL code: its frame is outside titan_mem, as a real library's would be."""
    raise ValueError("NCCL communicator was aborted")


@pytest.mark.parametrize("show", [False, True])
def test_unexpected_error_keeps_its_traceback_in_the_run_folder(tmp_path, capsys, monkeypatch, show):
    monkeypatch.setattr(train, "clip_grad_norm_", deep_library_failure)
    monkeypatch.setenv(TRACEBACK_ENV, "1" if show else "0")
    run = tmp_path / "run"
    rc = train.main([*TINY, f"--job.dump_folder={run}", "--training.steps=1", "--checkpoint.enable=false"])
    err = capsys.readouterr().err
    log = run / "error.log"
    assert rc == 1
    assert _error_lines(err) == [f"error: ValueError: NCCL communicator was aborted (traceback in {log})"]
    text = log.read_text()
    assert text.startswith("Traceback") and "deep_library_failure" in text and "in train" in text
    assert ("deep_library_failure" in err) is show  # TITAN_MEM_TRACEBACK=1 also prints it
    assert not list(run.glob("*.tmp"))


def test_unexpected_error_before_the_config_parsed_prints_its_traceback(capsys, monkeypatch):
    def parse_failure(argv):
        raise RuntimeError("tomllib broke")

    monkeypatch.setattr(train.config_mod, "parse_args", parse_failure)
    assert train.main(["--training.steps=1"]) == 1
    err = capsys.readouterr().err
    assert "parse_failure" in err
    assert _error_lines(err) == ["error: RuntimeError: tomllib broke (traceback above)"]


@pytest.mark.parametrize(
    "arg,needle",
    [("--training.stepz=3", "training.stepz"), ("--data.source=./missing.jsonl", "missing.jsonl")],
)
def test_user_error_stays_one_line(tmp_path, capsys, arg, needle):
    """An unknown key (ConfigError) and a missing data file (FileNotFoundError raised by our data source,
    after the run folder is known) are the user's to fix: no traceback anywhere."""
    run = tmp_path / "run"
    rc = train.main([*TINY, f"--job.dump_folder={run}", "--checkpoint.enable=false", arg])
    error_line((rc, capsys.readouterr().err), needle)
    assert not (run / "error.log").exists()


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("did not raise")


def test_which_errors_are_the_users():
    # a UserError (here a bad config value), and a path refused by torch: the message says what to fix
    assert is_user_error(_raised(lambda: parse_args([*TINY, "--model.vocab_size=0"])))
    # a plain ValueError raised in our own code is a bug of ours (an assertion about our inputs), not the
    # user's: it keeps its traceback
    assert not is_user_error(_raised(lambda: padded_vocab_size(0)))
    missing = _raised(lambda: torch.load("/nonexistent/model.pt"))
    assert isinstance(missing, OSError) and missing.errno == errno.ENOENT and is_user_error(missing)
    # a ValueError raised inside torch, an OSError without a path errno: unexpected, keep the traceback
    assert not is_user_error(_raised(lambda: torch.utils.data.DataLoader([], batch_size=-1)))
    assert not is_user_error(_raised(lambda: deep_library_failure()))
    assert not is_user_error(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert not is_user_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
