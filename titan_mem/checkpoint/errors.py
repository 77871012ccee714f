"""Checkpoint errors: one line naming the path and what is wrong (the CLIs print it as `error: ...`)."""

from __future__ import annotations

import os


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path and the problem."""


class ConvertError(CheckpointError):
    """An input or output a checkpoint tool cannot use; `str()` is one line `<path>: <what>`."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(f"{path}: {what}")


def root_cause(e: BaseException) -> str:
    """First line of the innermost error (DCP wraps per-rank failures in a dict)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # (exception, traceback summary)
        e = inner if isinstance(inner, BaseException) else getattr(inner, "exc", e)
    text = f"{type(e).__name__}: {str(e).strip()}".splitlines()
    return (text[0] if text else type(e).__name__)[:300]
