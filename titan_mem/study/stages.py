"""The commands a study runs, one subprocess per stage: pretrain the base (if the study gives a recipe),
count background slot usage, evaluate the base once, and one finetuning run per arm.

Subprocesses keep a crashed arm from taking the study down, let arms run side by side (`--jobs`, one
thread budget or one GPU each) and give every run the trainer's own resume and error handling. Every
command is a `python -m` entry point of this package, run from the study's working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.checkpoint import step_dirs
from titan_mem.config import Config
from titan_mem.study.spec import Arm, StudySpec

# Keys of the synthetic world an arm must share with its base (people, QA split, world seed).
WORLD_KEYS = ("synthetic_known_people", "synthetic_new_people", "synthetic_qa_people")


@dataclass
class Layout:
    """Where a study writes: everything under `spec.out`."""

    root: Path

    @property
    def base_run(self) -> Path:
        return self.root / "base"

    @property
    def counts(self) -> Path:
        return self.root / "background_counts.safetensors"

    @property
    def base_eval(self) -> Path:
        return self.root / "base_eval.json"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    def arm_dir(self, arm: Arm) -> Path:
        return self.root / "arms" / arm.name

    def arm_done(self, arm: Arm) -> Path:
        return self.arm_dir(arm) / "arm.json"


@dataclass
class Command:
    """One stage: its argv, the log it writes, and extra environment."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=./:,+" for c in arg) else repr(arg)


def pretrain_config(spec: StudySpec, layout: Layout) -> Config:
    """The base recipe, resolved with the study's overrides and its dump folder under the study."""
    assert spec.pretrain_config is not None
    return config_mod.parse_args(
        [str(spec.pretrain_config), *spec.pretrain_overrides, f"--job.dump_folder={layout.base_run}"]
    )


def base_checkpoint(spec: StudySpec, layout: Layout) -> Path:
    """The checkpoint every arm starts from: the given one, or the recipe's last step."""
    if spec.base_checkpoint is not None:
        return spec.base_checkpoint
    cfg = pretrain_config(spec, layout)
    return layout.base_run / cfg.checkpoint.folder / f"step-{cfg.training.steps}"


def base_is_trained(spec: StudySpec, layout: Layout) -> bool:
    ckpt = base_checkpoint(spec, layout)
    return ckpt.is_dir() and int(ckpt.name.split("-")[1]) in step_dirs(ckpt.parent)


def pretrain_command(spec: StudySpec, layout: Layout) -> Command:
    argv = [sys.executable, "-m", "titan_mem.train", str(spec.pretrain_config), *spec.pretrain_overrides]
    argv.append(f"--job.dump_folder={layout.base_run}")
    return Command("pretrain base", argv, layout.root / "logs" / "pretrain.log")


def world_overrides(base_cfg: Config) -> list[str]:
    """Pin the finetuning runs to the base's synthetic world (its people and seed), whatever data.seed."""
    d = base_cfg.data
    if d.source != "synthetic" and d.source_type != "synthetic":
        return []
    pins = [f"--data.{k}={getattr(d, k)}" for k in WORLD_KEYS]
    return [*pins, f"--data.synthetic_seed={d.world_seed()}"]


def finetune_overrides(spec: StudySpec, base_cfg: Config) -> list[str]:
    """What every finetuning-shaped command shares: the study's finetune overrides and the base's world."""
    return [*world_overrides(base_cfg), *spec.finetune_overrides]


def counts_command(spec: StudySpec, layout: Layout, base: Path, base_cfg: Config) -> Command:
    argv = [
        sys.executable, "-m", "titan_mem.study.worker", "counts",
        "--base", str(base), "--finetune-config", str(spec.finetune_config),
        "--batches", str(spec.background_batches), "--out", str(layout.counts),
        *finetune_overrides(spec, base_cfg),
    ]  # fmt: skip
    return Command("background counts", argv, layout.root / "logs" / "counts.log")


def eval_args(spec: StudySpec) -> list[str]:
    args = ["--tasks", ",".join(spec.eval_tasks), "--limit", str(spec.eval_limit)]
    return args + (["--data-dir", spec.eval_data_dir] if spec.eval_data_dir else [])


def base_eval_command(spec: StudySpec, layout: Layout, base: Path, base_cfg: Config) -> Command:
    argv = [
        sys.executable, "-m", "titan_mem.study.worker", "eval",
        "--base", str(base), "--finetune-config", str(spec.finetune_config),
        "--out", str(layout.base_eval), *eval_args(spec), *finetune_overrides(spec, base_cfg),
    ]  # fmt: skip
    return Command("evaluate base", argv, layout.root / "logs" / "base_eval.log")


def arm_command(spec: StudySpec, layout: Layout, arm: Arm, base: Path, base_cfg: Config) -> Command:
    """The arm's finetuning run: in-loop evaluation every `eval.every` steps and at the end (the base is
    evaluated once, by the runner); no checkpoints (the study keeps numbers, not weights)."""
    tasks = ",".join(spec.eval_tasks)
    argv = [
        sys.executable, "-m", "titan_mem.train", str(spec.finetune_config),
        *finetune_overrides(spec, base_cfg), *arm.overrides(),
        f"--job.dump_folder={layout.arm_dir(arm)}",
        f"--checkpoint.initial_load_path={base}",
        f"--finetune.background_counts={layout.counts}",
        "--checkpoint.enable=false",
        f"--eval.tasks={tasks}", f"--eval.every={spec.eval_every}", "--eval.at_start=false",
        f"--eval.limit={spec.eval_limit}",
        *([f"--eval.data_dir={spec.eval_data_dir}"] if spec.eval_data_dir else []),
    ]  # fmt: skip
    return Command(arm.name, argv, layout.arm_dir(arm) / "train.log")


def run_command(cmd: Command, threads: int | None = None, gpu: str | None = None) -> tuple[int, str]:
    """Run to completion with stdout+stderr in `cmd.log`; returns (exit code, last non-empty log line)."""
    cmd.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cmd.env}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with cmd.log.open("w") as log:
        log.write(f"$ {cmd.shell()}\n")
        log.flush()
        rc = subprocess.run(cmd.argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    lines = [ln.strip() for ln in cmd.log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, lines[-1] if lines else ""
