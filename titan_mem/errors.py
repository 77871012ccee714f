"""The project's errors and the one rule for what a command prints when it fails.

`UserError` is bad input the user can fix (a config key, a file, a checkpoint, a hub name, a study file):
a command prints its message as one `error: ...` line and exits 2. Every other exception is ours to fix
and keeps its traceback (`report_unexpected`). The lowest layer (docs/architecture.md): every package
raises these, so this module imports nothing from titan_mem."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix; `str()` is one line naming the file, key or value at fault."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; its message is one line naming the key.

    Also a ValueError: value checks deep in a section (`validate()`) raise ValueError and the loader
    re-raises them as ConfigError naming the key."""


class DataError(UserError, ValueError):
    """A data, tokenizer or results file (or a record in one) that cannot be used; one line naming it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (a data source, tokenizer, records file) does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the path and the problem."""


class TrainingError(UserError, RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); nothing is saved for the failing step."""


class HubError(UserError, ValueError):
    """A hub name that cannot be fetched; one line with the hub's own reason."""


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
    """Turn a failed write (disk full, torch's or safetensors' own I/O errors, a DCP write's
    `CheckpointException`, which derives from BaseException) into one CheckpointError line naming `out`;
    our own errors and interrupts pass unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as e:
        raise write_failure(out, what, e) from None
    except BaseException as e:
        if type(e).__name__ not in ("SafetensorError", "CheckpointException"):
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


def is_user_error(e: BaseException) -> bool:
    """Whether a command prints `e` as one `error:` line (exit 2) rather than keeping its traceback: a
    `UserError`, or an OSError refusing a path or out of space (ENOENT, EACCES, EROFS, ENOSPC, ...: its
    message names the path, wherever it was raised), also when a rank of a DCP write raised it (torch
    wraps those). Anything else, a ValueError of ours included, is a bug to fix and keeps its traceback."""
    e = innermost(e)
    return isinstance(e, UserError) or (isinstance(e, OSError) and e.errno in _PATH_ERRNOS)


def quiet_lost_connections(worker_id: int | None = None) -> None:
    """No traceback for a connection the other side dropped: multiprocessing's resource sharer (the thread
    that passes tensors between a data-loader worker and its parent) reports one through sys.excepthook
    when either goes away, which is how an interrupted command's workers end. Installed in every
    data-loader worker (`worker_init_fn`) and in a command once a signal arrived; other errors keep theirs."""
    sys_hook, thread_hook = sys.excepthook, threading.excepthook

    def quiet_sys(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if not issubclass(kind, (EOFError, ConnectionError)):
            sys_hook(kind, value, tb)

    def quiet_thread(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, (EOFError, ConnectionError)):
            thread_hook(args)

    sys.excepthook, threading.excepthook = quiet_sys, quiet_thread


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
