"""Run a study: per base (geometry x base seed) pretrain (-> HF export -> heal, for a retrofit) -> background
counts -> base evaluation, and every arm once its base's counts exist; then results + report.

Jobs run `--jobs` at a time as soon as what they need is done, so arms of one base run while the next base
pretrains. Each job is skipped when its output exists, so an interrupted or crashed study resumes where it
stopped: a base run resumes from its own checkpoints, an arm is finished when its `arm.json` holds its
records and the command that made them (an arm whose command changed, or that died half-way, runs again
from its start). A failed job does not stop the others (only what depends on it); the study exits non-zero
and names it.

One study at a time per `out` (a lock held for the whole run; an arm folder a live process holds is never
deleted: study/lock.py); SIGINT / SIGTERM reach every running job and stop the study cleanly (study/stop.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_mem import config as config_mod
from titan_mem.components.bench import machine_info
from titan_mem.config import Config
from titan_mem.errors import ConfigError, TrainingError
from titan_mem.eval.runner import write_json, write_jsonl
from titan_mem.sparse.select import NEEDS_BACKGROUND
from titan_mem.study.lock import StudyLock, refuse_held_arms, remove_stale_run
from titan_mem.study.overview import write_study_report
from titan_mem.study.results import arm_records, base_records, healed_records
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
    facts_command,
    layout_of,
    method_argv,
    pretrain_command,
    retrofit_commands,
    run_command,
)
from titan_mem.study.stop import Children, StudyInterrupted

POLL_S = 0.5  # how often the scheduler looks for a stop signal while jobs run


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
    rule = params.get("top_t_rule", "fixed")
    if ranking not in NEEDS_BACKGROUND and rule != "poisson":
        return None
    return arm.background or spec.background


def _starts_from(spec: StudySpec, layout: Layout, key: BaseKey, start: str = "") -> Path | None:
    """The checkpoint a run of this base loads; None where it reads [base] hf_model as it is."""
    if start == "hf" or (spec.hf_model and not spec.geometry(key.geometry).retrofit):
        return None
    return base_checkpoint(spec, layout, key)


def _eval_job(spec: StudySpec, layout: Layout, key: BaseKey, deps: list[str], healed: bool) -> Job:
    """A base record's evaluation (or, `healed`, a retrofit's healed model beside an `hf` reference)."""
    first = next(iter(spec.methods.values()))
    hf_ref = spec.reference == "hf" and not healed
    base = Path(spec.hf_model) if hf_ref else base_checkpoint(spec, layout, key)  # type: ignore[arg-type]
    cfg = base_config(spec, layout, key)
    ft = method_argv(spec, layout, first, key, cfg, start="hf" if hf_ref else "")
    cmd = base_eval_command(spec, layout, key, base, ft, healed=healed)
    what = "healed" if healed else "base"
    out, items = (
        Path(cmd.argv[cmd.argv.index("--out") + 1]),
        Path(cmd.argv[cmd.argv.index("--items-out") + 1]),
    )
    committed = layout.base_result(key, what)

    def done() -> bool:
        return (committed is not None and committed.is_file()) or (out.is_file() and items.is_file())

    return Job(cmd, done, deps, base=key)


def _in_run_order(arms: list[Arm]) -> list[Arm]:
    """Seed by seed, and within a seed the first configuration of every series, then the second, ...: a
    study interrupted anywhere has compared every method on the same footing before it widens any one."""
    nth: dict[tuple, int] = {}
    order = []
    for arm in arms:
        series = (arm.geometry, arm.group, arm.series, arm.base_seed, arm.seed)
        nth[series] = nth.get(series, -1) + 1
        order.append((arm.base_seed, arm.seed, nth[series]))
    return [arm for _, arm in sorted(zip(order, arms), key=lambda pair: pair[0])]


def plan(spec: StudySpec) -> list[Job]:
    """Every job the study runs, in order (what `--dry-run` prints); checks each arm's config."""
    layout = layout_of(spec)
    jobs: list[Job] = []
    counts_jobs: dict[Path, Job] = {}
    base_names: dict[BaseKey, list[str]] = {}
    facts: list[str] = []
    if spec.facts is not None:
        key0 = base_keys(spec)[0]
        first = next(iter(spec.methods.values()))
        cmd = facts_command(spec, layout, method_argv(spec, layout, first, key0, Config(), start="hf"))
        f = spec.facts
        files = [f.split_file(n) for n in [*f.splits, *(["known_eval"] if f.known else [])]]
        jobs.append(Job(cmd, lambda: f.ids.is_file() and all(p.is_file() for p in files)))
        facts = [cmd.name]
    for key in base_keys(spec):
        deps: list[str] = []
        if spec.pretrain_config is not None:
            cmd = pretrain_command(spec, layout, key)
            if cmd.name not in (j.name for j in jobs):  # retrofits of one dense base share its run
                jobs.append(Job(cmd, lambda k=key: base_is_trained(spec, layout, k)))
            deps = [cmd.name]
        retrofit = bool(spec.geometry(key.geometry).retrofit)
        if retrofit:  # export -> heal, each after the one before
            for cmd, done in retrofit_commands(spec, layout, key):
                jobs.append(Job(cmd, done, deps))
                deps = [cmd.name]
        jobs.append(_eval_job(spec, layout, key, facts if spec.reference == "hf" else deps + facts, False))
        if retrofit and spec.reference == "hf":
            jobs.append(_eval_job(spec, layout, key, deps + facts, True))
        base_names[key] = deps + facts
    for arm in _in_run_order(spec.arms):
        key = BaseKey(arm.geometry, arm.base_seed)
        base, cfg = _starts_from(spec, layout, key, arm.start), base_config(spec, layout, key)
        ft = method_argv(spec, layout, spec.methods[arm.method], key, cfg, arm.start)
        try:
            config_mod.parse_args(arm_argv(spec, arm, ft))  # the trainer's own checks, before anything runs
        except ConfigError as e:
            raise StudyError(f"{spec.path}: arm {arm.name}: {e}") from None
        kind = _counts_kind(spec, arm)
        counts = None
        deps = list(facts if arm.start == "hf" else base_names[key])
        if kind is not None and base is not None:
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
    """Its records exist (the committed file, else arm.json) and were made by this very command."""
    for done in (layout.arm_result(arm), layout.arm_done(arm)):
        if done is None or not done.is_file():
            continue
        try:
            return json.loads(done.read_text()).get("command") == cmd.argv[1:]
        except (json.JSONDecodeError, OSError):
            return False
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
    """Run whatever is not done yet; returns the results file. Raises StudyFailed naming failed jobs,
    StudyError when another study holds `out` or a live run an arm folder to redo, StudyInterrupted on
    SIGINT / SIGTERM (every job stopped)."""
    layout = layout_of(spec)
    todo = plan(spec)  # every arm checked before anything is written
    with StudyLock(layout.root):  # creates out; one study at a time
        refuse_held_arms([layout.arm_dir(j.arm) for j in todo if j.arm is not None and not j.done()])
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
    """The records of every evaluated base and finished arm (what results.jsonl holds): the committed
    files where the study keeps them, else the run folders."""
    failed_arms = {j.arm for j in (failed or {}) if j.arm is not None}
    records: list[dict] = []
    for key in base_keys(spec):
        committed = layout.base_result(key)
        if committed is not None and committed.is_file():
            records += json.loads(committed.read_text())["records"]
        elif layout.base_eval(key).is_file() and layout.base_items(key).is_file():
            records += base_records(key, layout.base_eval(key), layout.base_items(key))
    for arm in spec.arms:
        if arm in failed_arms:
            continue
        for done in (layout.arm_result(arm), layout.arm_done(arm)):
            if done is not None and done.is_file():
                records += json.loads(done.read_text())["records"]
                break
    return records


def _git_commit() -> str:
    """The code's commit ("+dirty" with uncommitted changes; "unknown" outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _provenance(cmd: Command, seconds: float) -> dict:
    """What a committed result file says of where it came from: command, commit, machine, time taken."""
    return {"command": cmd.argv[1:], "commit": _git_commit(), "machine": machine_info(),
            "seconds": round(seconds, 1)}  # fmt: skip


def _commit_result(layout: Layout, job: Job, seconds: float, arm_recs: list[dict] | None = None) -> None:
    """A finished job's records (an arm's: `arm_recs`, as just collected) into the study's results
    folder, when it keeps one (temp file + rename: whole or absent)."""
    if layout.committed is None:
        return
    if job.arm is not None:
        path, records = layout.arm_result(job.arm), arm_recs or []
    elif job.base is not None:
        healed = job.name.startswith("evaluate healed")
        path = layout.base_result(job.base, "healed" if healed else "base")
        if healed:
            records = healed_records(layout, job.base)
        else:
            records = base_records(job.base, layout.base_eval(job.base), layout.base_items(job.base))
    else:
        return
    assert path is not None
    write_json(path, {**_provenance(job.cmd, seconds), "records": _rounded(records)})


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits: the committed files stay small and diff-able."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _needed(todo: list[Job], done: set[str]) -> set[str]:
    """The jobs still to run: unfinished evaluations and arms, and what they wait for (a heal or counts
    whose every user is finished, e.g. on a new machine with the committed results, is not rerun)."""
    by_name = {j.name: j for j in todo}
    leaves = {j.name for j in todo if j.arm is not None or j.base is not None}
    leaves |= {j.name for j in todo if not any(j.name in k.deps for k in todo)}
    stack = [name for name in leaves if name not in done]
    need: set[str] = set()
    while stack:
        name = stack.pop()
        if name in need or name in done:
            continue
        need.add(name)
        stack += by_name[name].deps
    return need


def _run_jobs(
    layout: Layout, todo: list[Job], n_workers: int, gpus: list[str] | None, threads: int,
    log: Callable[[str], None],
) -> dict[Job, str]:  # fmt: skip
    """Run the jobs not done yet, each once its dependencies succeeded; returns the failed (or skipped
    because a dependency failed) jobs with their logs. On SIGINT / SIGTERM (main thread): the signal goes to
    every running job, none starts, and StudyInterrupted is raised once they are gone (study/stop.py)."""
    by_name = {j.name: j for j in todo}
    state: dict[str, str] = {}  # name -> ok | failed
    for j in todo:
        if j.done():
            state[j.name] = "ok"
    need = _needed(todo, set(state))
    for j in todo:
        if j.name not in need:
            state[j.name] = "ok"  # done, or needed by nothing left to run
    pending = [j for j in todo if j.name not in state]
    if len(pending) < len(todo):
        log(f"[study] {len(todo) - len(pending)} of {len(todo)} jobs done before, skipped")
    free = list(gpus or [None] * n_workers)
    lock = threading.Lock()
    children = Children()
    failed: dict[Job, str] = {}
    started, n_total, n_done = time.perf_counter(), len(pending), 0

    def one(job: Job, threads: int) -> tuple[int, str, float, bool]:
        """(exit code, last log line or why it did not run, seconds, whether it ran)."""
        with lock:
            gpu = free.pop()
        try:
            if children.signum is not None:
                return 128 + children.signum, "not started: the study is stopping", 0.0, False
            if job.arm is not None:  # died half-way: start again, unless a live run holds the folder
                refused = remove_stale_run(layout.arm_dir(job.arm))
                if refused is not None:
                    return 2, refused, 0.0, False
            t = time.perf_counter()
            rc, last = run_command(job.cmd, threads=None if gpu else threads, gpu=gpu, children=children)
            if children.signum is not None:  # stopped by a signal: whatever it left is not a result
                return rc or 128 + children.signum, last, time.perf_counter() - t, True
            if rc == 0 and job.arm is not None:
                seconds = time.perf_counter() - t
                records = arm_records(job.arm, layout.arm_dir(job.arm))
                write_json(layout.arm_done(job.arm), {"command": job.cmd.argv[1:], "seconds": seconds,
                                                      "records": records})  # fmt: skip
            if rc == 0:
                _commit_result(layout, job, time.perf_counter() - t, records if job.arm is not None else None)
            return rc, last, time.perf_counter() - t, True
        finally:
            with lock:
                free.append(gpu)

    running: dict[Future, Job] = {}
    with children.on_signals(), ThreadPoolExecutor(max_workers=n_workers) as pool:
        while (pending or running) and children.signum is None:
            for job in list(pending):
                if any(state.get(d) == "failed" for d in job.deps):
                    pending.remove(job)
                    state[job.name] = "failed"
                    failed[job] = (
                        f"not run: {', '.join(d for d in job.deps if state.get(d) == 'failed')} failed"
                    )
                elif children.signum is not None:
                    break
                elif len(running) < n_workers and all(state.get(d) == "ok" for d in job.deps):
                    pending.remove(job)
                    log(f"[study] {job.name} ... (log: {job.cmd.log})")
                    # a job that must run alone (all others wait for it: facts, a heal) gets every core
                    alone = not running and not any(
                        all(state.get(d) == "ok" for d in k.deps) for k in pending
                    )
                    running[pool.submit(one, job, threads * n_workers if alone else threads)] = job
            if not running:
                if pending and children.signum is None:  # nothing can start: a dependency is missing
                    raise StudyFailed(f"{pending[0].name}: waits for {pending[0].deps}, which never ran")
                break
            finished, _ = wait(list(running), timeout=POLL_S, return_when=FIRST_COMPLETED)
            if children.signum is not None:
                break
            for fut in finished:
                job = running.pop(fut)
                rc, last, seconds, ran = fut.result()
                n_done += 1
                eta = (time.perf_counter() - started) / n_done * (n_total - n_done)
                state[job.name] = "ok" if rc == 0 else "failed"
                status = "ok" if rc == 0 else f"FAILED (exit {rc}): {last}"
                log(
                    f"[study] {n_done}/{n_total} {job.name}: {status} in {seconds:.0f} s, "
                    f"~{eta / 60:.1f} min left"
                )
                if rc != 0:
                    failed[job] = str(job.cmd.log) if ran else last
        if children.signum is not None:
            stopped = [j.name for j in running.values()]
            log(f"[study] {signal.Signals(children.signum).name}: stopping {len(stopped)} running job(s)")
            children.stop()
            wait(list(running))
            raise StudyInterrupted(children.signum, stopped)
    assert all(n in by_name for n in state)
    return failed
