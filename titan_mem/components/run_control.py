"""A run's hold on its dump folder and its reaction to the scheduler: one live run per folder, a save and a
clean exit on preemption signals, no training process outliving its launcher.

Why: two runs writing one dump folder interleave steps and overwrite each other's checkpoints; SLURM (and
most schedulers) announce preemption with SIGTERM or a chosen signal shortly before killing the job; a
`kill -9` of torchrun leaves its workers training and saving on their own.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import torch

from titan_mem.distributed import all_reduce_sum
from titan_mem.errors import UserError

LOCK_FILE = ".run.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class FolderLockedError(UserError, RuntimeError):
    """Another live run holds the dump folder; the message is one line naming it and the holder."""


class RunLock:
    """An exclusive `flock` on `<dump_folder>/.run.lock`, held by rank 0 for the life of the process.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a crashed or killed
    run is simply taken over: there is no stale-lock state to clean up.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise FolderLockedError(
                f"{self.path}: another run is using this dump folder ({holder}); wait for it to end or set "
                "another job.dump_folder"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the trainer asks `requested()` at each step boundary (all ranks agree,
    so every rank saves the same step), saves and exits 0, and a requeued job resumes from that save."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal (one tiny all-reduce)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)


def die_with_launcher() -> None:
    """Under torchrun, ask Linux to SIGKILL this worker if its launcher dies (prctl PR_SET_PDEATHSIG), so a
    `kill -9` of torchrun cannot leave workers training and saving on their own. Elsewhere a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
