"""Run a study: per base (geometry x base seed) pretrain (-> HF export -> heal, for a retrofit) -> background
counts -> base evaluation, and every arm once its base's counts exist; then results + report.

Jobs run `--jobs` at a time as soon as what they need is done, so arms of one base run while the next base
pretrains. Each job is skipped when its output exists, so an interrupted or crashed study resumes where it
stopped: a base run resumes from its own checkpoints, an arm is finished when its `arm.json` holds its
records and the command that made them (an arm whose command changed, or that died half-way, runs again
from its start). A failed job does not stop the others (only what depends on it); the study exits non-zero
and names it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.errors import TrainingError
from titan_mem.eval.runner import write_json, write_jsonl
from titan_mem.study.overview import write_study_report
from titan_mem.study.results import arm_records, base_records
from titan_mem.study.spec import Arm, StudyError, StudySpec
from titan_mem.study.stages import (
    BaseKey,
    Command,
    Layout,
    arm_argv,
    arm_command,
    base_checkpoint,
    base_config,
    base_eval_command,
    base_is_trained,
    base_keys,
    counts_command,
    layout_of,
    method_argv,
    pretrain_command,
    retrofit_commands,
    run_command,
)


class StudyFailed(TrainingError):
    """A stage or arm exited non-zero: names it and its log."""


@dataclass(eq=False)  # jobs are keys of the failed-jobs map: identity, not field equality
class Job:
    """One command of the plan, what it waits for, and how to tell it already ran."""

    cmd: Command
    done: Callable[[], bool]
    deps: list[str] = field(default_factory=list)
    arm: Arm | None = None
    base: BaseKey | None = None

    @property
    def name(self) -> str:
        return self.cmd.name


def _counts_kind(spec: StudySpec, arm: Arm) -> str | None:
    """The background corpus an arm's selection reads; None when it needs no counts (dense methods,
    tf / all rankings)."""
    if arm.mode != "sparse_finetune":
        return None
    params = dict(arm.params)
    ranking = params.get("ranking")
    if ranking is None:
        ranking = config_mod.parse_args([str(spec.methods[arm.method].config)]).finetune.ranking
    rule = params.get("rule", "fixed")
    if ranking in ("tf", "all") and rule != "poisson":
        return None
    return arm.background or spec.background


def plan(spec: StudySpec) -> list[Job]:
    """Every job the study runs, in order (what `--dry-run` prints); checks each arm's config."""
    layout = layout_of(spec)
    jobs: list[Job] = []
    first_method = next(iter(spec.methods.values()))
    counts_jobs: dict[Path, Job] = {}
    base_names: dict[BaseKey, list[str]] = {}
    for key in base_keys(spec):
        base, cfg = base_checkpoint(spec, layout, key), base_config(spec, layout, key)
        deps: list[str] = []
        if spec.pretrain_config is not None:
            cmd = pretrain_command(spec, layout, key)
            if cmd.name not in (j.name for j in jobs):  # retrofits of one dense base share its run
                jobs.append(Job(cmd, lambda k=key: base_is_trained(spec, layout, k)))
            deps = [cmd.name]
        if spec.geometry(key.geometry).retrofit:  # export -> heal, each after the one before
            for cmd, done in retrofit_commands(spec, layout, key):
                jobs.append(Job(cmd, done, deps))
                deps = [cmd.name]
        ev = base_eval_command(spec, layout, key, base, method_argv(spec, layout, first_method, key, cfg))
        jobs.append(Job(ev, lambda k=key: layout.base_eval(k).is_file() and layout.base_items(k).is_file(),
                        deps, base=key))  # fmt: skip
        base_names[key] = deps
    for arm in spec.arms:
        key = BaseKey(arm.geometry, arm.base_seed)
        base, cfg = base_checkpoint(spec, layout, key), base_config(spec, layout, key)
        ft = method_argv(spec, layout, spec.methods[arm.method], key, cfg)
        try:
            config_mod.parse_args(arm_argv(spec, arm, ft))  # the trainer's own checks, before anything runs
        except config_mod.ConfigError as e:
            raise StudyError(f"{spec.path}: arm {arm.name}: {e}") from None
        kind = _counts_kind(spec, arm)
        counts = None
        deps = list(base_names[key])
        if kind is not None:
            cc = counts_command(spec, layout, key, base, ft, kind)
            counts = Path(cc.argv[cc.argv.index("--out") + 1])
            if counts not in counts_jobs:
                counts_jobs[counts] = Job(cc, lambda p=counts: p.is_file(), list(base_names[key]))
                jobs.append(counts_jobs[counts])
            deps.append(counts_jobs[counts].name)
        cmd = arm_command(spec, layout, arm, base, ft, counts)
        jobs.append(Job(cmd, lambda a=arm, c=cmd: arm_is_done(layout, a, c), deps, arm=arm))
    return jobs


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
    """Run whatever is not done yet; returns the results file. Raises StudyFailed naming failed jobs."""
    layout = layout_of(spec)
    layout.root.mkdir(parents=True, exist_ok=True)
    todo = plan(spec)
    t0 = time.perf_counter()
    n_workers = len(gpus) if gpus else max(1, jobs)
    per_job = threads or max(1, (os.cpu_count() or 1) // n_workers)
    failed = _run_jobs(layout, todo, n_workers, gpus, per_job, log)
    records = collect(spec, layout, failed)
    write_jsonl(layout.results, records)
    if report:
        write_study_report(spec, layout, records)
    n_arms = sum(1 for j in todo if j.arm is not None)
    n_ok = n_arms - sum(1 for j in failed if j.arm is not None)
    log(f"[study] {spec.name}: {n_ok}/{n_arms} arms, results in {layout.results}, report in "
        f"{layout.root / 'report.md'} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if failed:
        names = ", ".join(f"{j.name} ({failed[j]})" for j in list(failed)[:3])
        raise StudyFailed(f"{len(failed)} job(s) failed: {names}; rerun the study to retry them")
    return layout.results


def collect(spec: StudySpec, layout: Layout, failed: dict[Job, str] | None = None) -> list[dict]:
    """The records of every evaluated base and finished arm (what results.jsonl holds)."""
    failed_arms = {j.arm for j in (failed or {}) if j.arm is not None}
    records: list[dict] = []
    for key in base_keys(spec):
        if layout.base_eval(key).is_file() and layout.base_items(key).is_file():
            records += base_records(key, layout.base_eval(key), layout.base_items(key))
    for arm in spec.arms:
        if layout.arm_done(arm).is_file() and arm not in failed_arms:
            records += json.loads(layout.arm_done(arm).read_text())["records"]
    return records


def _run_jobs(
    layout: Layout, todo: list[Job], n_workers: int, gpus: list[str] | None, threads: int,
    log: Callable[[str], None],
) -> dict[Job, str]:  # fmt: skip
    """Run the jobs not done yet, each once its dependencies succeeded; returns the failed (or skipped
    because a dependency failed) jobs with their logs."""
    by_name = {j.name: j for j in todo}
    state: dict[str, str] = {}  # name -> ok | failed
    for j in todo:
        if j.done():
            state[j.name] = "ok"
    pending = [j for j in todo if j.name not in state]
    if len(pending) < len(todo):
        log(f"[study] {len(todo) - len(pending)} of {len(todo)} jobs done before, skipped")
    free = list(gpus or [None] * n_workers)
    lock = threading.Lock()
    failed: dict[Job, str] = {}
    started, n_total, n_done = time.perf_counter(), len(pending), 0

    def one(job: Job) -> tuple[int, str, float]:
        with lock:
            gpu = free.pop()
        try:
            if job.arm is not None and layout.arm_dir(job.arm).exists():  # died half-way: start again
                shutil.rmtree(layout.arm_dir(job.arm))
            t = time.perf_counter()
            rc, last = run_command(job.cmd, threads=None if gpu else threads, gpu=gpu)
            if rc == 0 and job.arm is not None:
                seconds = time.perf_counter() - t
                records = arm_records(job.arm, layout.arm_dir(job.arm))
                write_json(layout.arm_done(job.arm), {"command": job.cmd.argv[1:], "seconds": seconds,
                                                      "records": records})  # fmt: skip
            return rc, last, time.perf_counter() - t
        finally:
            with lock:
                free.append(gpu)

    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        while pending or running:
            for job in list(pending):
                if any(state.get(d) == "failed" for d in job.deps):
                    pending.remove(job)
                    state[job.name] = "failed"
                    failed[job] = (
                        f"not run: {', '.join(d for d in job.deps if state.get(d) == 'failed')} failed"
                    )
                elif len(running) < n_workers and all(state.get(d) == "ok" for d in job.deps):
                    pending.remove(job)
                    log(f"[study] {job.name} ... (log: {job.cmd.log})")
                    running[pool.submit(one, job)] = job
            if not running:
                if pending:  # nothing can start: a dependency is missing from the plan
                    raise StudyFailed(f"{pending[0].name}: waits for {pending[0].deps}, which never ran")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                rc, last, seconds = fut.result()
                n_done += 1
                eta = (time.perf_counter() - started) / n_done * (n_total - n_done)
                state[job.name] = "ok" if rc == 0 else "failed"
                status = "ok" if rc == 0 else f"FAILED (exit {rc}): {last}"
                log(
                    f"[study] {n_done}/{n_total} {job.name}: {status} in {seconds:.0f} s, "
                    f"~{eta / 60:.1f} min left"
                )
                if rc != 0:
                    failed[job] = str(job.cmd.log)
    assert all(n in by_name for n in state)
    return failed
