"""The commands a study runs, one subprocess per stage: per geometry and base seed, pretrain the base (if the
study gives a recipe; a retrofit geometry then exports it to HF format and heals its retrofit), count
background slot usage (one file per background corpus and batch shape),
evaluate the base once; then one finetuning run per arm.

Subprocesses keep a crashed arm from taking the study down, let arms run side by side (`--jobs`, one
thread budget or one GPU each) and give every run the trainer's own resume and error handling. Every
command is a `python -m` entry point of this package, run from the study's working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.checkpoint import step_dirs
from titan_mem.config import Config
from titan_mem.study.spec import Arm, Method, StudySpec, eval_steps, load_study
from titan_mem.study.stop import Children

# Keys of the synthetic world an arm must share with its base (people, QA split, world seed).
WORLD_KEYS = ("synthetic_known_people", "synthetic_new_people", "synthetic_qa_people")


@dataclass(frozen=True)
class BaseKey:
    """One base model: a memory geometry and a pretraining seed."""

    geometry: str
    seed: int


@dataclass
class Layout:
    """Where a study writes: everything under `root` (= spec.out), bases under `base_root` (another
    study's out when the study borrows its bases: `[base] study = ...`)."""

    root: Path
    base_root: Path | None = None
    # geometry -> the geometry whose pretraining run it shares (retrofits of one dense base)
    pretrain_of: dict[str, str] = field(default_factory=dict)
    committed: Path | None = None  # [study] results: a small JSON per finished evaluation and arm

    def pretrain_name(self, key: BaseKey) -> str:
        return self.pretrain_of.get(key.geometry, key.geometry)

    def base_run(self, key: BaseKey) -> Path:
        return (self.base_root or self.root) / self.pretrain_name(key) / f"base-b{key.seed}"

    def base_files(self, key: BaseKey) -> Path:
        return self.root / key.geometry / f"base-b{key.seed}-files"

    def counts(self, key: BaseKey, background: str, batch: int, seq_len: int) -> Path:
        return self.base_files(key) / f"counts-{background}-{batch}x{seq_len}.safetensors"

    def hf_export(self, key: BaseKey) -> Path:
        """A retrofit geometry's dense base in HF format (what `retrofit.base` names)."""
        return self.base_files(key) / "hf"

    def heal_run(self, key: BaseKey) -> Path:
        return (self.base_root or self.root) / key.geometry / f"heal-b{key.seed}"

    def base_eval(self, key: BaseKey) -> Path:
        return self.base_files(key) / "eval.json"

    def base_items(self, key: BaseKey) -> Path:
        return self.base_files(key) / "eval_items.jsonl"

    def healed_eval(self, key: BaseKey) -> Path:
        """A retrofit's healed model beside an `hf` reference (the retrofit's own cost)."""
        return self.base_files(key) / "healed_eval.json"

    def healed_items(self, key: BaseKey) -> Path:
        return self.base_files(key) / "healed_eval_items.jsonl"

    def base_result(self, key: BaseKey, what: str = "base") -> Path | None:
        """The committed record of a base (`what` = base | healed) evaluation, if the study keeps them."""
        return self.committed / key.geometry / f"{what}-b{key.seed}.json" if self.committed else None

    def arm_result(self, arm: Arm) -> Path | None:
        """The committed records of an arm, if the study keeps them."""
        return self.committed / arm.geometry / arm.group / f"{arm.name}.json" if self.committed else None

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    def arm_dir(self, arm: Arm) -> Path:
        return self.root / arm.geometry / "arms" / arm.group / arm.name

    def arm_done(self, arm: Arm) -> Path:
        return self.arm_dir(arm) / "arm.json"


def layout_of(spec: StudySpec) -> Layout:
    # retrofit geometries with the same dense recipe share one pretraining run (the first one's folder)
    shared = {g.name: next(h.name for h in spec.geometries if h.retrofit and h.overrides == g.overrides)
              for g in spec.geometries if g.retrofit}  # fmt: skip
    if spec.base_study is None:
        return Layout(spec.out, pretrain_of=shared, committed=spec.results)
    return Layout(spec.out, load_study(spec.base_study).out, shared, spec.results)


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
    return arg if arg and all(c.isalnum() or c in "-_=./:,+[]" for c in arg) else repr(arg)


def base_keys(spec: StudySpec) -> list[BaseKey]:
    """The bases the arms start from, geometry by geometry."""
    used = {(a.geometry, a.base_seed) for a in spec.arms}
    return [BaseKey(g.name, s) for g in spec.geometries for s in spec.base_seeds if (g.name, s) in used]


def _recipe_world(spec: StudySpec) -> list[str]:
    """Pins of the recipe's synthetic world, so a base seed moves init and document order, not the people."""
    assert spec.pretrain_config is not None
    return world_overrides(config_mod.parse_args([str(spec.pretrain_config), *spec.pretrain_overrides]))


def pretrain_argv(spec: StudySpec, layout: Layout, key: BaseKey) -> list[str]:
    """The base recipe's trainer arguments: the study's overrides, the geometry, the seed, the folder."""
    assert spec.pretrain_config is not None
    return [
        str(spec.pretrain_config), *spec.pretrain_overrides, *_recipe_world(spec),
        *spec.geometry(key.geometry).overrides, f"--job.seed={key.seed}", f"--data.seed={key.seed}",
        f"--job.dump_folder={layout.base_run(key)}",
    ]  # fmt: skip


def pretrain_config(spec: StudySpec, layout: Layout, key: BaseKey) -> Config:
    return config_mod.parse_args(pretrain_argv(spec, layout, key))


def hf_overrides(spec: StudySpec) -> list[str]:
    """What makes a run read [base] hf_model as it is: its architecture and weights, no memory layer, no
    checkpoint (a method config may name a healed one)."""
    return [f"--retrofit.base={spec.hf_model}", "--retrofit.layers=[]", "--checkpoint.initial_load_path="]


def pretrained_checkpoint(spec: StudySpec, layout: Layout, key: BaseKey) -> Path:
    """The given base checkpoint, the given HF model, or the recipe's last step."""
    if spec.base_checkpoint is not None:
        return spec.base_checkpoint
    if spec.hf_model is not None:
        return Path(spec.hf_model)
    cfg = pretrain_config(spec, layout, key)
    return layout.base_run(key) / cfg.checkpoint.folder / f"step-{cfg.training.steps}"


def base_checkpoint(spec: StudySpec, layout: Layout, key: BaseKey) -> Path:
    """The checkpoint a base's arms start from: the pretrained one, or a retrofit geometry's healed one."""
    if not spec.geometry(key.geometry).retrofit:
        return pretrained_checkpoint(spec, layout, key)
    cfg = config_mod.parse_args(heal_argv(spec, layout, key))
    return layout.heal_run(key) / cfg.checkpoint.folder / f"step-{cfg.training.steps}"


def retrofit_overrides(spec: StudySpec, layout: Layout, key: BaseKey) -> list[str]:
    """What makes every run of a retrofit geometry read the retrofitted model (nothing for the others)."""
    g = spec.geometry(key.geometry)
    if not g.retrofit:
        return hf_overrides(spec) if spec.hf_model else []
    hf = spec.hf_model or layout.hf_export(key)  # a given HF model, or the study's dense base exported
    return [f"--retrofit.base={hf}", *g.retrofit]


def heal_argv(spec: StudySpec, layout: Layout, key: BaseKey) -> list[str]:
    """A retrofit geometry's healing run (Goyal et al. 2026, stage 2): its heal config on the recipe's
    world, the retrofit of the exported dense base, the base seed."""
    g = spec.geometry(key.geometry)
    assert g.heal_config is not None
    return [
        str(g.heal_config), *(_recipe_world(spec) if spec.pretrain_config else []), *g.heal_overrides,
        *retrofit_overrides(spec, layout, key),
        f"--job.seed={key.seed}", f"--data.seed={key.seed}", f"--job.dump_folder={layout.heal_run(key)}",
    ]  # fmt: skip


def is_trained(ckpt: Path) -> bool:
    return ckpt.is_dir() and int(ckpt.name.split("-")[1]) in step_dirs(ckpt.parent)


def retrofit_commands(
    spec: StudySpec, layout: Layout, key: BaseKey
) -> list[tuple[Command, Callable[[], bool]]]:
    """A retrofit geometry's stages before counts and evaluation: HF export of the study's dense base (none
    for a given [base] hf_model), then healing; each with its test of being done."""
    log = (layout.base_root or layout.root) / key.geometry / "logs"
    heal = [sys.executable, "-m", "titan_mem.train", *heal_argv(spec, layout, key)]
    healed = base_checkpoint(spec, layout, key)
    jobs = [(Command(f"heal base {key.geometry}/b{key.seed}", heal, log / f"heal-b{key.seed}.log"),
             lambda: is_trained(healed))]  # fmt: skip
    if spec.hf_model:
        return jobs
    hf = layout.hf_export(key)
    export = [sys.executable, "-m", "titan_mem.study.worker", "to-hf",
              "--base", str(pretrained_checkpoint(spec, layout, key)), "--out", str(hf)]  # fmt: skip
    name = f"export base {key.geometry}/b{key.seed}"
    return [
        (Command(name, export, log / f"export-b{key.seed}.log"), lambda: (hf / "config.json").is_file()),
        *jobs,
    ]


def base_config(spec: StudySpec, layout: Layout, key: BaseKey) -> Config:
    """The base's run config (its synthetic world): from its run folder, or the recipe before it ran."""
    if spec.base_checkpoint is not None:
        from titan_mem.hf.checkpoint_config import load_checkpoint_config

        return load_checkpoint_config(spec.base_checkpoint)
    if spec.hf_model:
        if not spec.geometry(key.geometry).retrofit:
            return Config()  # no synthetic world to pin
        return config_mod.parse_args(heal_argv(spec, layout, key))
    return pretrain_config(spec, layout, key)


def base_is_trained(spec: StudySpec, layout: Layout, key: BaseKey) -> bool:
    return is_trained(pretrained_checkpoint(spec, layout, key))


def pretrain_command(spec: StudySpec, layout: Layout, key: BaseKey) -> Command:
    argv = [sys.executable, "-m", "titan_mem.train", *pretrain_argv(spec, layout, key)]
    name = layout.pretrain_name(key)
    log = (layout.base_root or layout.root) / name / "logs" / f"pretrain-b{key.seed}.log"
    return Command(f"pretrain base {name}/b{key.seed}", argv, log)


def world_overrides(base_cfg: Config) -> list[str]:
    """Pin the finetuning runs to the base's synthetic world (its people and seed), whatever data.seed."""
    d = base_cfg.data
    if d.source != "synthetic" and d.source_type != "synthetic":
        return []
    pins = [f"--data.{k}={getattr(d, k)}" for k in WORLD_KEYS]
    return [*pins, f"--data.synthetic_seed={d.world_seed()}"]


def method_argv(
    spec: StudySpec, layout: Layout, method: Method, key: BaseKey, base_cfg: Config, start: str = ""
) -> list[str]:
    """A method's finetuning config as every command of that method reads it: its own config, the base's
    world, the study's stream, the geometry (model and finetuning keys; a retrofit geometry's retrofit
    instead of its dense base's model keys; `start` = "hf": the HF model as it is), then the method's own
    overrides (which win over the study-wide ones: a method may have its own regime or t)."""
    g = spec.geometry(key.geometry)
    as_is = start == "hf" or (spec.hf_model is not None and not g.retrofit)  # the HF model: no world
    if as_is:
        model = hf_overrides(spec)
    else:
        model = retrofit_overrides(spec, layout, key) if g.retrofit else list(g.overrides)
    return [
        str(method.config), *([] if as_is else world_overrides(base_cfg)), *spec.finetune_overrides, *model,
        *g.arm_overrides, *method.overrides,
    ]  # fmt: skip


def shape_of(cfg: Config) -> tuple[int, int]:
    """The finetuning batch shape (sequences, seq_len) the background counts must match."""
    return cfg.training.global_batch_size, cfg.training.seq_len


def counts_command(
    spec: StudySpec, layout: Layout, key: BaseKey, base: Path, ft_argv: list[str], background: str
) -> Command:
    """Background counts of one base, in the batch shape of the finetuning config `ft_argv` describes,
    over the corpus `background` names (pretrain | finetune | heldout)."""
    batch, seq_len = shape_of(config_mod.parse_args(ft_argv))
    out = layout.counts(key, background, batch, seq_len)
    argv = [
        sys.executable, "-m", "titan_mem.study.worker", "counts", "--base", str(base),
        "--background", background, "--batches", str(spec.background_batches), "--out", str(out), *ft_argv,
    ]  # fmt: skip
    name = f"background counts {key.geometry}/b{key.seed} ({background}, {batch}x{seq_len})"
    return Command(name, argv, layout.base_files(key) / f"counts-{background}-{batch}x{seq_len}.log")


def eval_args(spec: StudySpec) -> list[str]:
    args = ["--tasks", ",".join(spec.eval_tasks), "--limit", str(spec.eval_limit)]
    args += ["--shots", str(spec.eval_shots), "--shots-seed", str(spec.eval_shots_seed)]
    return args + (["--data-dir", spec.eval_data_dir] if spec.eval_data_dir else [])


def base_eval_command(
    spec: StudySpec, layout: Layout, key: BaseKey, base: Path, ft_argv: list[str], healed: bool = False
) -> Command:
    """The base record's evaluation; `healed`: a retrofit's healed model beside an `hf` reference."""
    out, items = (layout.healed_eval(key), layout.healed_items(key)) if healed else (
        layout.base_eval(key), layout.base_items(key))  # fmt: skip
    argv = [
        sys.executable, "-m", "titan_mem.study.worker", "eval", "--base", str(base),
        "--out", str(out), "--items-out", str(items), *eval_args(spec), *ft_argv,
    ]  # fmt: skip
    what = "healed" if healed else "base"
    return Command(f"evaluate {what} {key.geometry}/b{key.seed}", argv, out.with_suffix(".log"))


def facts_command(spec: StudySpec, layout: Layout, ft_argv: list[str]) -> Command:
    """Choose the study's new facts from [base] hf_model's own answers (study/facts.py), or rewrite the
    split files from the committed ids."""
    f = spec.facts
    assert f is not None and spec.hf_model is not None
    argv = [
        sys.executable, "-m", "titan_mem.study.worker", "facts", "--study", str(spec.path),
        "--base", spec.hf_model, "--out", str(f.ids),
        *(["--data-dir", spec.eval_data_dir] if spec.eval_data_dir else []), *ft_argv,
    ]  # fmt: skip
    return Command("choose facts", argv, f.out / "facts.log")


def arm_argv(spec: StudySpec, arm: Arm, ft_argv: list[str]) -> list[str]:
    """The arm's trainer arguments before its folders: its method's config, then its sweep values."""
    return [*ft_argv, *arm.overrides()]


def arm_command(
    spec: StudySpec, layout: Layout, arm: Arm, base: Path | None, ft_argv: list[str], counts: Path | None
) -> Command:
    """The arm's finetuning run from checkpoint `base` (None: the HF model its overrides name): in-loop
    evaluation at the study's (log-spaced) steps; no checkpoints (the study keeps numbers, not weights)."""
    argv = arm_argv(spec, arm, ft_argv)
    steps = config_mod.parse_args(argv).training.steps
    at = ",".join(str(s) for s in eval_steps(spec, steps))
    argv = [
        sys.executable, "-m", "titan_mem.train", *argv,
        f"--job.dump_folder={layout.arm_dir(arm)}",
        *([f"--checkpoint.initial_load_path={base}"] if base is not None else []),
        *([f"--finetune.background_counts={counts}"] if counts is not None else []),
        "--checkpoint.enable=false",
        f"--eval.tasks={','.join(spec.eval_tasks)}", f"--eval.at_steps={at}", "--eval.every=0",
        "--eval.at_start=false", f"--eval.limit={spec.eval_limit}",
        f"--eval.shots={spec.eval_shots}", f"--eval.shots_seed={spec.eval_shots_seed}",
        *([f"--eval.data_dir={spec.eval_data_dir}"] if spec.eval_data_dir else []),
    ]  # fmt: skip
    return Command(f"{arm.geometry}/{arm.group}/{arm.name}", argv, layout.arm_dir(arm) / "train.log")


def run_command(
    cmd: Command, threads: int | None = None, gpu: str | None = None, children: Children | None = None
) -> tuple[int, str]:
    """Run to completion with stdout+stderr in `cmd.log`; returns (exit code, last non-empty log line).
    With `children`, in its own process group, which a signal to the study reaches (study/stop.py)."""
    cmd.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cmd.env}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with cmd.log.open("w") as log:
        log.write(f"$ {cmd.shell()}\n")
        log.flush()
        out = {"stdout": log, "stderr": subprocess.STDOUT, "env": env}
        if children is not None:
            rc = children.run(cmd.argv, **out)
        else:
            rc = subprocess.run(cmd.argv, **out, check=False).returncode  # type: ignore[call-overload]
    lines = [ln.strip() for ln in cmd.log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, lines[-1] if lines else ""
