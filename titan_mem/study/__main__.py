"""`python -m titan_mem.study STUDY.toml [--jobs N | --gpus 0,1] [--quick] [--base STEP] [--geometry G]
[--group G] [--arm NAME] [--dry-run] [--report-only]`

Runs a continual-learning study (docs/results.md): per geometry and base seed the base, its background
counts and its evaluation, every arm as soon as its base is ready, then `results.jsonl`, `report.md`,
`summary.json` and PNG plots under the study's `out` folder. Rerunning skips what is done. `--dry-run`
checks the file (every key, task, metric, path and output: study/validate.py) and every arm's config and
prints the commands.

A run holds `<out>/.study.lock` throughout: a second study on the same `out` exits 2 naming the holder.
`--dry-run` and `--report-only` do not take it (study/lock.py says why that is safe); each says when a study
is running there. SIGINT / SIGTERM stop every running job and exit 130 / 143 with one line (study/stop.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.errors import ConfigError
from titan_mem.study.lock import STUDY_LOCK, lock_holder
from titan_mem.study.overview import write_study_report
from titan_mem.study.runner import collect, plan, run_study
from titan_mem.study.spec import load_study
from titan_mem.study.stages import layout_of
from titan_mem.study.stop import StudyInterrupted
from titan_mem.study.subset import only_arms, only_geometries, only_groups, with_base


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_mem.study", description=__doc__.split("\n")[3])
    parser.add_argument("study", help="study file (studies/*.toml)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs run side by side (CPU: threads split)")
    parser.add_argument("--gpus", help="comma-separated GPU ids: one job per GPU at a time")
    parser.add_argument("--threads", type=int, help="threads per job (default: cores / jobs)")
    parser.add_argument("--quick", action="store_true", help="the study file's [quick] version")
    parser.add_argument("--base", help="start every arm from this checkpoint instead of the file's [base]")
    parser.add_argument(
        "--geometry",
        action="append",
        help="run only this geometry (repeatable): a study too long for one "
        "sitting runs geometry by geometry, each analysed on its own",
    )
    parser.add_argument("--group", action="append", help="run only this group of arms (repeatable)")
    parser.add_argument("--arm", action="append", help="run only this arm, e.g. sparse-lr3000.0-b0-seed0 "
                        "(repeatable; the names --dry-run prints)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check everything, print the commands")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and plots")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1; got {args.jobs}")
    spec = load_study(args.study, quick=args.quick)
    if args.geometry:
        spec = only_geometries(spec, args.geometry)
    if args.group:
        spec = only_groups(spec, args.group)
    if args.arm:
        spec = only_arms(spec, args.arm)
    if args.base:
        spec = with_base(spec, args.base)
    if args.dry_run:
        jobs = plan(spec)
        for job in jobs:
            after = f"; after: {', '.join(job.deps)}" if job.deps else ""
            print(f"# {job.name}  (log: {job.cmd.log}{after})\n{job.cmd.shell()}")
        n_arms = sum(1 for j in jobs if j.arm is not None)
        print(f"# {len(jobs)} jobs, {n_arms} arms; outputs under {spec.out}")
        _say_if_running(spec.out, "a run now would be refused")
        return
    if args.report_only:  # reads finished records only; writes the report files whole (study/lock.py)
        _say_if_running(spec.out, "this report is interim; the study rewrites it when it ends")
        layout = layout_of(spec)
        print(write_study_report(spec, layout, collect(spec, layout)))
        return
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    run_study(spec, jobs=args.jobs, gpus=gpus, threads=args.threads)


def _say_if_running(out: Path, consequence: str) -> None:
    holder = lock_holder(out / STUDY_LOCK)
    if holder is not None:
        print(f"# note: a study is running on {out} ({holder}): {consequence}")


def main() -> int:
    # a study-file error, a failed stage or arm: one `error:` line (the trainer's convention), exit 2;
    # stopped by SIGINT / SIGTERM while jobs ran: one line naming them, exit 130 / 143
    stopped: list[StudyInterrupted] = []

    def study() -> None:
        try:
            run(sys.argv[1:])
        except StudyInterrupted as e:  # caught here: run_cli would take it for a bug
            stopped.append(e)

    rc = run_cli(study)
    if stopped:
        print(f"error: {stopped[0]}", file=sys.stderr, flush=True)
        return stopped[0].exit_code
    return rc


if __name__ == "__main__":
    exit_process(main())
