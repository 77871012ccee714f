"""`lm_eval` with the `titan_mem` model registered: lm-evaluation-harness's own command line, unchanged.

    python -m titan_mem.eval.lm_eval_cli --model titan_mem --model_args checkpoint=RUN/checkpoints/step-N \\
        --tasks titan_mem_hellaswag_local,titan_mem_gsm8k_nll_local --batch_size 16 --output_path out/

Why a wrapper: lm-eval 0.4.13 finds models only in its registry, which its CLI fills from its own
`lm_eval.models` and nothing else (no entry points, no plugin imports), so a plain `lm_eval --model
titan_mem` cannot see an outside model. This module imports the adapter (registration) and calls the
harness's `cli_evaluate` with the same arguments, plus `--include_path <the project's task YAMLs>` when the
command names no include path (`run`, `ls`, `validate` all take it; name several as "A:B").
"""

from __future__ import annotations

import sys
from typing import NoReturn

from titan_mem.distributed import exit_process


def with_task_path(argv: list[str]) -> list[str]:
    """argv with `--include_path <project task YAMLs>` added unless it names one (or asks for help)."""
    from titan_mem.eval.lm_eval_tasks import TASKS_DIR

    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    import titan_mem.eval.lm_eval_adapter  # noqa: F401  (registers "titan_mem")
    from titan_mem.cli import run_cli

    sys.argv = [sys.argv[0], *with_task_path(sys.argv[1:])]
    return run_cli(cli_evaluate)


def cli() -> NoReturn:
    """Console-script entry: exit without interpreter teardown (see `exit_process`: gloo)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
