"""How every command line ends: a user error is one `error: ...` line and exit code 2; an interrupt
(Ctrl-C, SIGTERM) is one line and exit code 130/143; anything else is a bug of ours, printed as one line
with its traceback kept (errors.report_unexpected), exit code 1.

One level above `errors` and `distributed` (docs/architecture.md): `train`, `generate`, the study and the
tools all run through `run_cli`, so none of them has to import another to get it, and a signal is handled
once, here. Outputs are written to a temporary name and renamed when complete, so an interrupted command
leaves no half-written file (docs/reliability.md)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from titan_mem.distributed import shutdown
from titan_mem.errors import (
    UNEXPECTED_EXIT,
    innermost,
    is_user_error,
    quiet_lost_connections,
    report_unexpected,
)


class Interrupted(BaseException):
    """A termination signal arrived (SIGTERM): unwinds like Ctrl-C's KeyboardInterrupt, so `finally`
    blocks and context managers clean up (temporary files, data-loader workers) before the exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    quiet_lost_connections()  # before unwinding: data-loader workers go while the stack unwinds
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def run_cli(fn: Callable[[], object], dump_folder: Callable[[], str | None] = lambda: None) -> int:
    """Run a command; a user error becomes one `error: ...` line and exit code 2, SIGINT / SIGTERM one
    line and 128 + the signal number, an unexpected error one line and exit code 1 with its traceback in
    `dump_folder()`/error.log (stderr when that is None or unwritable; both with TITAN_MEM_TRACEBACK=1).
    A run that installs its own SIGTERM handler (the Trainer saves a checkpoint on it) replaces this one
    while it runs. The process group is shut down either way."""
    main_thread = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in handled} if main_thread else {}
    try:
        fn()
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        # on a line of its own: a progress line (counts, tqdm) is usually still open
        print(
            f"\nerror: interrupted by {name}; no output of this command was completed",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    except BaseException as e:  # torch's CheckpointException derives from BaseException, not Exception
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        if is_user_error(e):
            cause = innermost(e)
            print(f"error: {cause if cause is not e else e}", file=sys.stderr, flush=True)
            return 2
        report_unexpected(e, dump_folder())
        return UNEXPECTED_EXIT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown()
