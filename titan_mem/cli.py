"""How every command line ends: a user error is one `error: ...` line and exit code 2; anything else is a
bug of ours, printed as one line with its traceback kept (errors.report_unexpected), exit code 1.

One level above `errors` and `distributed` (docs/architecture.md): `train`, `generate`, the study and the
tools all run through `run_cli`, so none of them has to import another to get it."""

from __future__ import annotations

import sys
from collections.abc import Callable

from titan_mem.distributed import shutdown
from titan_mem.errors import UNEXPECTED_EXIT, is_user_error, report_unexpected


def run_cli(fn: Callable[[], object], dump_folder: Callable[[], str | None] = lambda: None) -> int:
    """Run a command; a user error becomes one `error: ...` line and exit code 2, an unexpected one also
    one line and exit code 1, its traceback in `dump_folder()`/error.log (stderr when that is None or
    unwritable; both with TITAN_MEM_TRACEBACK=1). The process group is shut down either way."""
    try:
        fn()
        return 0
    except Exception as e:
        if is_user_error(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        report_unexpected(e, dump_folder())
        return UNEXPECTED_EXIT
    finally:
        shutdown()
