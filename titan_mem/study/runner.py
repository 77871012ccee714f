"""Run a study: base -> background counts -> base evaluation -> every arm (in parallel) -> results + report.

Each stage is skipped when its output exists, so an interrupted or crashed study resumes where it stopped:
the base run resumes from its own checkpoints, an arm is finished when its `arm.json` holds its records
and the command that made them (an arm whose command changed, or that died half-way, runs again from its
start). A failed arm does not stop the others; the study exits non-zero and names it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from titan_mem import config as config_mod
from titan_mem.config import Config
from titan_mem.eval.runner import load_checkpoint_config, write_json, write_jsonl
from titan_mem.study.report import write_report
from titan_mem.study.results import arm_records, base_record
from titan_mem.study.spec import Arm, StudyError, StudySpec
from titan_mem.study.stages import (
    Command,
    Layout,
    arm_command,
    base_checkpoint,
    base_eval_command,
    base_is_trained,
    counts_command,
    pretrain_command,
    pretrain_config,
    run_command,
)
from titan_mem.train import TrainingError


class StudyFailed(TrainingError):
    """A stage or arm exited non-zero: names it and its log."""


def base_config(spec: StudySpec, layout: Layout) -> Config:
    """The base's run config (its synthetic world): from its run folder, or the recipe before it ran."""
    if spec.base_checkpoint is not None:
        return load_checkpoint_config(spec.base_checkpoint)
    return pretrain_config(spec, layout)


def plan(spec: StudySpec) -> list[Command]:
    """Every command the study runs, in order (what `--dry-run` prints); checks each arm's config."""
    layout = Layout(spec.out)
    base, cfg = base_checkpoint(spec, layout), base_config(spec, layout)
    out = [pretrain_command(spec, layout)] if spec.pretrain_config is not None else []
    out += [counts_command(spec, layout, base, cfg), base_eval_command(spec, layout, base, cfg)]
    for arm in spec.arms:
        cmd = arm_command(spec, layout, arm, base, cfg)
        try:
            config_mod.parse_args(cmd.argv[3:])  # the trainer's own checks, before anything runs
        except config_mod.ConfigError as e:
            raise StudyError(f"{spec.path}: arm {arm.name}: {e}") from None
        out.append(cmd)
    return out


def arm_is_done(layout: Layout, arm: Arm, cmd: Command) -> bool:
    done = layout.arm_done(arm)
    if not done.is_file():
        return False
    try:
        return json.loads(done.read_text()).get("command") == cmd.argv[1:]
    except (json.JSONDecodeError, OSError):
        return False


def run_study(
    spec: StudySpec,
    *,
    jobs: int = 1,
    gpus: list[str] | None = None,
    threads: int | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run whatever is not done yet; returns the results file. Raises StudyFailed naming failed stages."""
    layout = Layout(spec.out)
    layout.root.mkdir(parents=True, exist_ok=True)
    commands = plan(spec)
    t0 = time.perf_counter()
    jobs = len(gpus) if gpus else max(1, jobs)
    per_job = threads or max(1, (os.cpu_count() or 1) // jobs)

    def stage(cmd: Command, done: bool, threads_: int) -> None:
        if done:
            log(f"[study] {cmd.name}: done before, skipped")
            return
        log(f"[study] {cmd.name} ... (log: {cmd.log})")
        t = time.perf_counter()
        rc, last = run_command(cmd, threads=threads_, gpu=gpus[0] if gpus else None)
        if rc != 0:
            raise StudyFailed(f"{cmd.name} failed (exit {rc}): {last} (log: {cmd.log})")
        log(f"[study] {cmd.name}: {time.perf_counter() - t:.0f} s")

    all_threads = threads or os.cpu_count() or 1
    stages = commands[: len(commands) - len(spec.arms)]
    if spec.pretrain_config is not None:
        stage(stages.pop(0), base_is_trained(spec, layout), all_threads)
    stage(stages[0], layout.counts.is_file(), all_threads)
    stage(stages[1], layout.base_eval.is_file(), all_threads)

    arm_cmds = dict(zip(spec.arms, commands[-len(spec.arms) :]))
    pending = [a for a in spec.arms if not arm_is_done(layout, a, arm_cmds[a])]
    if len(pending) < len(spec.arms):
        log(f"[study] {len(spec.arms) - len(pending)} of {len(spec.arms)} arms done before, skipped")
    failed = _run_arms(layout, pending, arm_cmds, jobs, gpus, per_job, log)

    records = [base_record(json.loads(layout.base_eval.read_text()))]
    for arm in spec.arms:
        if layout.arm_done(arm).is_file() and arm not in failed:
            records += json.loads(layout.arm_done(arm).read_text())["records"]
    write_jsonl(layout.results, records)
    if report:
        write_report(spec, layout.results, layout.root)
    n_ok = len(spec.arms) - len(failed)
    log(f"[study] {spec.name}: {n_ok}/{len(spec.arms)} arms, results in {layout.results}, report in "
        f"{layout.root / 'report.md'} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if failed:
        names = ", ".join(f"{a.name} ({failed[a]})" for a in list(failed)[:3])
        raise StudyFailed(f"{len(failed)} arm(s) failed: {names}; rerun the study to retry them")
    return layout.results


def _run_arms(
    layout: Layout,
    pending: list[Arm],
    cmds: dict[Arm, Command],
    jobs: int,
    gpus: list[str] | None,
    threads: int,
    log: Callable[[str], None],
) -> dict[Arm, str]:
    """Run the pending arms, `jobs` at a time (one GPU each when given); returns the failed ones."""
    free = list(gpus or [None] * jobs)
    lock = threading.Lock()
    failed: dict[Arm, str] = {}
    started = time.perf_counter()

    def one(arm: Arm) -> tuple[Arm, int, str, float]:
        with lock:
            gpu = free.pop()
        try:
            run_dir = layout.arm_dir(arm)
            if run_dir.exists():  # a run that died half-way: start it again from the base
                shutil.rmtree(run_dir)
            t = time.perf_counter()
            rc, last = run_command(cmds[arm], threads=None if gpu else threads, gpu=gpu)
            if rc == 0:
                done: dict[str, Any] = {"command": cmds[arm].argv[1:], "seconds": time.perf_counter() - t}
                write_json(layout.arm_done(arm), {**done, "records": arm_records(arm, run_dir)})
            return arm, rc, last, time.perf_counter() - t
        finally:
            with lock:
                free.append(gpu)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, arm) for arm in pending]
        for k, fut in enumerate(as_completed(futures), 1):
            arm, rc, last, seconds = fut.result()
            eta = (time.perf_counter() - started) / k * (len(pending) - k)
            status = "ok" if rc == 0 else f"FAILED (exit {rc}): {last}"
            left = f"~{eta / 60:.1f} min left"
            log(f"[study] arm {k}/{len(pending)} {arm.name}: {status} in {seconds:.0f} s, {left}")
            if rc != 0:
                failed[arm] = str(cmds[arm].log)
    return failed
