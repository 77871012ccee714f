"""`python -m titan_mem.study STUDY.toml [--jobs N | --gpus 0,1] [--quick] [--base STEP] [--geometry G]
[--group G] [--arm NAME] [--dry-run] [--report-only]`

Runs a continual-learning study (docs/results.md): per geometry and base seed the base, its background
counts and its evaluation, every arm as soon as its base is ready, then `results.jsonl`, `report.md`,
`summary.json` and PNG plots under the study's `out` folder. Rerunning skips what is done. `--dry-run`
checks the file and every arm's config and prints the commands.
"""

from __future__ import annotations

import argparse
import sys

from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.errors import ConfigError
from titan_mem.study.overview import write_study_report
from titan_mem.study.runner import collect, plan, run_study
from titan_mem.study.spec import load_study
from titan_mem.study.stages import layout_of
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
        return
    if args.report_only:
        layout = layout_of(spec)
        print(write_study_report(spec, layout, collect(spec, layout)))
        return
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    run_study(spec, jobs=args.jobs, gpus=gpus, threads=args.threads)


def main() -> int:
    # a study-file error, a failed stage or arm: one `error:` line (the trainer's convention), exit 2
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
