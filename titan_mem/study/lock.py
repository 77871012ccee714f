"""A study's hold on its output folder, and what it may delete there.

One live study per `out`: the runner holds an exclusive `flock` on `<out>/.study.lock` for its whole run
(`components/run_control.RunLock`, the trainer's own folder lock: the kernel drops it when the process dies,
however it dies, so no stale lock is left to clean up). A second study on the same folder is refused with
one line naming the folder and the holder (pid, host, since when), before it deletes or writes anything.

`--dry-run` and `--report-only` do not take it. A dry run writes nothing; it only asks whether the lock is
held (a shared lock taken and dropped at once, `lock_holder`) and says so. A report-only run reads finished
records only (arm.json, the committed files, the base evaluations: each written whole by a rename) and
writes report.md, summary.json and the plots, each whole by a rename too; beside a running study it gives
an interim report, which the study rewrites when it ends.

An arm folder left by a run that died half-way is deleted before the arm runs again, but never while a
live process holds its run lock (`.run.lock`, taken by the arm's trainer): e.g. a trainer left running by a
runner killed with SIGKILL, or a run started by hand. The folder is deleted while this process holds that
lock, so no trainer can take the folder meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from titan_mem.components.run_control import LOCK_FILE, FolderLockedError, RunLock
from titan_mem.study.keys import StudyError

STUDY_LOCK = ".study.lock"


class StudyLock(RunLock):
    """The exclusive lock on `<out>/.study.lock` (creates `out`), as a context manager."""

    def __init__(self, out: Path):
        super().__init__(out)
        self.out, self.path = out, out / STUDY_LOCK

    def acquire(self) -> None:
        try:
            super().acquire()
        except FolderLockedError:
            holder = _holder_text(self.path)
            raise StudyError(
                f"{self.out}: another study is running on this folder ({holder}); wait for it to end or "
                "set another [study] out"
            ) from None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(path: Path, fd: int | None = None) -> str:
    """What the holder wrote into its lock file: `pid N on HOST since TIME`."""
    try:
        raw = os.pread(fd, 200, 0) if fd is not None else path.read_bytes()[:200]
    except OSError:
        raw = b""
    return raw.decode(errors="replace").strip() or "unknown process"


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)  # never creates; flock needs no write access
    except OSError:
        return None


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` now (its `pid N on HOST since TIME` line), or None when it is free or
    absent. Takes a shared lock and drops it at once: never blocks, creates nothing."""
    fd = _open(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(path, fd)
    finally:
        os.close(fd)  # closing drops the shared lock
    return None


def held_run(folder: Path) -> str | None:
    """The holder of a run folder's `.run.lock` (a live trainer), or None."""
    return lock_holder(folder / LOCK_FILE)


def refuse_held_arms(folders: list[Path]) -> None:
    """One line naming the first of `folders` (arms still to run, left by an earlier run) that a live
    process holds: the study would otherwise delete it under that process."""
    for folder in folders:
        holder = held_run(folder)
        if holder is not None:
            raise StudyError(held_message(folder, holder))


def held_message(folder: Path, holder: str) -> str:
    return (
        f"{folder}: a live run holds this arm folder ({holder}); not deleted: stop that run or wait for it "
        "to end, then rerun the study"
    )


def remove_stale_run(folder: Path) -> str | None:
    """Delete the folder a run left half-way, unless a live process holds its run lock: then nothing is
    deleted and the one-line reason is returned. The lock is held by this process while it deletes."""
    if not folder.exists():
        return None
    fd = _open(folder / LOCK_FILE)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return held_message(folder, _holder_text(folder / LOCK_FILE, fd))
        shutil.rmtree(folder)
    finally:
        if fd is not None:
            os.close(fd)
    return None
