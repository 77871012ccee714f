"""Errors about files: one line naming the path and what is wrong (the CLIs print it as `error: ...`).

Here, not in `checkpoint/`, because writers everywhere (counts, checkpoints, conversions) use them and
must not import the checkpoint package (it imports the config, which imports them)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path and the problem."""


class ConvertError(CheckpointError):
    """An input or output a checkpoint tool cannot use; `str()` is one line `<path>: <what>`."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(f"{path}: {what}")


def innermost(e: BaseException) -> BaseException:
    """The error a rank hit (DCP wraps per-rank failures in a dict)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # (exception, traceback summary)
        e = inner if isinstance(inner, BaseException) else getattr(inner, "exc", e)
    return e


def root_cause(e: BaseException) -> str:
    """First line of the innermost error."""
    e = innermost(e)
    text = f"{type(e).__name__}: {str(e).strip()}".splitlines()
    return (text[0] if text else type(e).__name__)[:300]


_NO_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def write_failure(path: str | os.PathLike, what: str, e: BaseException) -> CheckpointError:
    """One line for a failed write: the cause, plus what the filesystem says (free space, `ulimit -f`),
    because torch's writers often replace the OS error by their own (e.g. "unexpected pos 704 vs 598")."""
    cause, seen = root_cause(e), innermost(e)
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            cause = f"{_NO_SPACE[seen.errno]}: {seen.strerror}"
            break
        seen = seen.__cause__ or seen.__context__
    notes = []
    try:
        notes.append(f"{shutil.disk_usage(_nearest_existing(Path(path))).free / 2**30:.2f} GiB free there")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        notes.append(f"the file size limit (ulimit -f) is {limit} bytes")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return CheckpointError(f"{path}: {what} failed: {cause}{extra}")


def _nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (what a write there would land in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Refuse an output that cannot be written before any work is done: its nearest existing folder must
    be a folder that takes a new file (a parent that is a file, /proc, a read-only mount all fail here)."""
    existing = _nearest_existing(out.parent)
    if not existing.is_dir():
        raise ConvertError(out, f"cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".titan_mem_write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConvertError(out, f"cannot be written: {existing} takes no new file ({e.strerror})") from None


@contextlib.contextmanager
def write_errors(out: Path, what: str) -> Iterator[None]:
    """Turn a failed write (disk full, torch's or safetensors' own I/O errors) into one CheckpointError
    line naming `out`; our own errors pass unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as e:
        raise write_failure(out, what, e) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise write_failure(out, what, e) from None
