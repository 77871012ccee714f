"""Errors about files: one line naming the path and what is wrong (the CLIs print it as `error: ...`),
and the one rule for what a CLI prints when it fails (`is_user_error`, `report_unexpected`).

Here, not in `checkpoint/`, because writers everywhere (counts, checkpoints, conversions) use them and
must not import the checkpoint package (it imports the config, which imports them)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path and the problem."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); nothing is saved for the failing step."""


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


# --- what a command line prints for an error -------------------------------------------------------------

TRACEBACK_ENV = "TITAN_MEM_TRACEBACK"  # =1: also print an unexpected error's traceback to stderr
UNEXPECTED_EXIT = 1  # a user error exits 2
# Refusals about a path the user gave or a full disk: the message names the path, a traceback adds nothing.
_PATH_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
    errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP, *_NO_SPACE,
}  # fmt: skip
_PACKAGE = Path(__file__).resolve().parent
_OUR_CODE = (str(_PACKAGE) + os.sep, str(_PACKAGE.parent / "tools") + os.sep)  # titan_mem/ and tools/


def _raised_by_us(e: BaseException) -> bool:
    """The innermost frame of `e`'s traceback is titan_mem's or a tool's: we raised it (or a builtin we
    called did), not torch, triton or another library underneath."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OUR_CODE)


def is_user_error(e: BaseException, classes: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether a command prints `e` as one `error:` line (exit 2) rather than keeping its traceback.

    User errors: an instance of `classes` (the project's own error classes, e.g. ConfigError,
    CheckpointError); an OSError refusing a path or out of space (ENOENT, EACCES, EROFS, ENOSPC, ...:
    its message names the path, wherever it was raised); a ValueError, OSError or missing module
    (ModuleNotFoundError) raised in titan_mem's or tools/' own code, which is how it reports bad input.
    Anything else, including a ValueError or OSError raised inside torch, triton or NCCL, is unexpected.
    """
    if isinstance(e, classes):
        return True
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS:
        return True
    return isinstance(e, (ValueError, OSError, ModuleNotFoundError)) and _raised_by_us(e)


def report_unexpected(e: BaseException, dump_folder: str | os.PathLike | None) -> None:
    """Print one `error:` line for an unexpected error and keep its traceback for diagnosis.

    The traceback goes to `<dump_folder>/error.log` on rank 0 and `error.rank{N}.log` on rank N (one
    file per rank, temp file + rename, replaced by a later failure); to stderr instead when the folder is
    unknown (the config did not parse) or cannot be written, and also to stderr with TITAN_MEM_TRACEBACK=1.
    """
    text = "".join(traceback.format_exception(e))
    message = str(e).strip().splitlines()
    head = f"{type(e).__name__}: {message[0][:300]}" if message else type(e).__name__
    where = None
    if dump_folder is not None:
        rank = int(os.environ.get("RANK", "0"))
        path = Path(dump_folder) / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
            where = path
        except OSError:
            pass
    if where is None or os.environ.get(TRACEBACK_ENV) == "1":
        print(text, end="", file=sys.stderr, flush=True)
    print(f"error: {head} (traceback {f'in {where}' if where else 'above'})", file=sys.stderr, flush=True)
