"""Stopping a study: SIGINT or SIGTERM to the runner reaches every job it runs, and nothing outlives it.

Each job runs in its own session, so its own process group (`start_new_session`): a terminal's Ctrl-C or a
scheduler's SIGTERM reaches the runner alone, and the runner forwards the signal to every running job's
process group (a trainer given SIGTERM stops at its next step boundary and saves: run_control.StopSignals),
starts no other job, waits at most `GRACE_S` seconds for them, kills what is left (SIGKILL to the group),
records nothing of a stopped job (an arm stopped early may exit 0, but it is not finished), and exits with
128 + the signal (130 for SIGINT, 143 for SIGTERM) and one line. A second signal kills the jobs at once.

Why: the jobs used to share the runner's process group, so a `kill` of the runner left its trainers running
as orphans, and a restarted runner deleted their folders under them. A runner killed with SIGKILL can
forward nothing: its jobs live on, each holding its folder's run lock, which a restarted runner respects
(study/lock.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

GRACE_S = 60.0  # a trainer's last step and save after SIGTERM
KILL_WAIT_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StudyInterrupted(BaseException):
    """The study stopped on a signal. A BaseException, like KeyboardInterrupt, so no `except Exception`
    takes it for an error; the study's `main` catches it inside `run_cli` (which would report it as a bug),
    prints its one line and exits with `exit_code`."""

    def __init__(self, signum: int, stopped: list[str]):
        self.signum, self.exit_code = signum, 128 + signum
        names = ", ".join(stopped[:3]) + (", ..." if len(stopped) > 3 else "")
        what = f"stopped {len(stopped)} running job(s) ({names})" if stopped else "no job was running"
        super().__init__(
            f"study interrupted by {signal.Signals(signum).name}: {what}; rerun the study to resume"
        )


class Children:
    """The job subprocesses running now, each the leader of its own process group, and the signal that
    stops the study (`signum`, None while it runs)."""

    def __init__(self, grace_s: float | None = None):
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self.signum: int | None = None
        self._cond = threading.Condition(threading.RLock())  # re-entered by a handler in the main thread
        self._procs: set[subprocess.Popen] = set()

    def run(self, argv: list[str], **kwargs: Any) -> int:
        """Run `argv` to completion in a new session; returns its exit code (128 + the signal, not started,
        when the study is stopping)."""
        with self._cond:
            if self.signum is not None:
                return 128 + self.signum
            proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._cond:
                self._procs.discard(proc)
                self._cond.notify_all()

    def forward(self, signum: int) -> None:
        """Send `signum` to every running job's process group."""
        with self._cond:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)

    def stop(self) -> None:
        """After the forwarded signal: wait at most `grace_s` for every job to exit, then SIGKILL the groups
        left and wait for them."""
        deadline = time.monotonic() + self.grace_s
        with self._cond:
            while self._procs and deadline - time.monotonic() > 0:
                self._cond.wait(min(deadline - time.monotonic(), 0.2))
            left = bool(self._procs)
        if left:
            self.forward(signal.SIGKILL)
            with self._cond:
                self._cond.wait_for(lambda: not self._procs, timeout=KILL_WAIT_S)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self.forward(signum)
        else:  # a second signal: no more waiting
            self.forward(signal.SIGKILL)

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[Children]:
        """SIGINT and SIGTERM stop the study (handlers restored after); a no-op outside the main thread,
        where Python runs no signal handler."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
