"""A study file (`studies/*.toml`): the base, the finetuning stream, the held-out evaluation and the arms
(method x sweep x seed), read into plain records. Every key is known; anything else is a one-line error
naming the file and key.

    [study]     name, out (folder), seeds = [0, 1, 2]
    [base]      checkpoint = "RUN/checkpoints/step-N"   | pretrain_config = "train_configs/x.toml"
                pretrain_overrides = ["--training.steps=400"], background_batches = 1000
    [finetune]  config = "train_configs/debug_sparse_finetune.toml", overrides = [...]
    [eval]      tasks = [...], every = 20, limit = 60, data_dir = "../shared/data"
                learning = "synthetic_qa/new_taught:answer_nll", forgetting = ["synthetic_qa/known:f1", ...]
                show = [...]  (more metrics for the report's tables)
    [[arm]]     method = "sparse" | "full" | "lora", plus sweep keys, each a value or a list of values:
                sparse: lr, top_t, ranking, rule (fixed | mass | poisson: adaptive t), mass, alpha;
                full: lr; lora: lr, rank; any method: optimizer (default sparse sgd, full/lora adamw)
    [quick]     what `--quick` changes: seeds, pretrain_overrides / finetune_overrides (appended),
                background_batches, limit, every, out (default: <out>-quick)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_mem.config import ConfigError, read_toml


class StudyError(ValueError):
    """A bad study file: one line naming the file and key."""


MODE_OF = {"sparse": "sparse_finetune", "full": "full_finetune", "lora": "lora_finetune"}
# Lin et al. 2025: sparse memory finetuning with SGD (AdamW forgets more), full finetuning and LoRA with AdamW
OPTIMIZER_OF = {"sparse": "sgd", "full": "adamw", "lora": "adamw"}
SWEEP_KEYS: dict[str, dict[str, str]] = {
    "sparse": {
        "lr": "optimizer.lr",
        "top_t": "finetune.top_t",
        "ranking": "finetune.ranking",
        "rule": "finetune.top_t_rule",
        "mass": "finetune.top_t_mass",
        "alpha": "finetune.top_t_alpha",
        "optimizer": "optimizer.name",
    },
    "full": {"lr": "optimizer.lr", "optimizer": "optimizer.name"},
    "lora": {"lr": "optimizer.lr", "rank": "finetune.lora_rank", "optimizer": "optimizer.name"},
}
# metrics where a higher value is better; every other metric (nll, ppl, bits_per_byte, answer_nll) is a loss
HIGHER_IS_BETTER = {"em", "f1", "acc", "acc_norm"}


@dataclass(frozen=True)
class MetricRef:
    """`task:metric`, e.g. synthetic_qa/new_taught:answer_nll."""

    task: str
    metric: str

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def __str__(self) -> str:
        return f"{self.task}:{self.metric}"


@dataclass(frozen=True)
class Arm:
    """One finetuning run: a method, one value per sweep key, a seed, and the trainer overrides they mean."""

    method: str
    params: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def name(self) -> str:
        parts = [self.method, *(f"{k}{v}" for k, v in self.params), f"seed{self.seed}"]
        return "-".join(str(p).replace("/", "_") for p in parts)

    def overrides(self) -> list[str]:
        """The trainer overrides of this arm. The seed moves the fact order (`data.seed`) and any random
        init (`job.seed`); the synthetic world stays the base's (the runner pins `data.synthetic_seed`)."""
        keys = SWEEP_KEYS[self.method]
        out = [
            f"--training.mode={MODE_OF[self.method]}",
            f"--optimizer.name={OPTIMIZER_OF[self.method]}",
            f"--job.seed={self.seed}",
            f"--data.seed={self.seed}",
        ]
        return out + [f"--{keys[k]}={v}" for k, v in self.params]


@dataclass
class StudySpec:
    path: Path
    name: str
    out: Path
    seeds: list[int]
    base_checkpoint: Path | None
    pretrain_config: Path | None
    pretrain_overrides: list[str]
    background_batches: int
    finetune_config: Path
    finetune_overrides: list[str]
    eval_tasks: list[str]
    eval_every: int
    eval_limit: int
    eval_data_dir: str | None
    learning: MetricRef
    forgetting: list[MetricRef]
    show: list[MetricRef]
    arms: list[Arm] = field(default_factory=list)


SECTIONS: dict[str, set[str]] = {
    "study": {"name", "out", "seeds"},
    "base": {"checkpoint", "pretrain_config", "pretrain_overrides", "background_batches"},
    "finetune": {"config", "overrides"},
    "eval": {"tasks", "every", "limit", "data_dir", "learning", "forgetting", "show"},
    "quick": {
        "seeds",
        "pretrain_overrides",
        "finetune_overrides",
        "background_batches",
        "limit",
        "every",
        "out",
    },  # fmt: skip
}


def load_study(path: str | Path, quick: bool = False) -> StudySpec:
    """Read and check a study file; relative paths are relative to the working directory (the repo root).
    `quick`: apply the file's [quick] table (a few-minute version of the same study)."""
    path = Path(path)
    try:
        data = read_toml(path, "study")
    except ConfigError as e:
        raise StudyError(str(e)) from None
    where = str(path)
    for name, table in data.items():
        if name == "arm":
            continue
        if name not in SECTIONS:
            raise StudyError(f"{where}: unknown section [{name}] (known: {', '.join([*SECTIONS, 'arm'])})")
        if not isinstance(table, dict):
            raise StudyError(f"{where}: '{name}' must be a [section]")
        for key in table:
            if key not in SECTIONS[name]:
                raise StudyError(f"{where}: unknown key {name}.{key}")
    study, base = data.get("study", {}), data.get("base", {})
    ft, ev = data.get("finetune", {}), data.get("eval", {})
    if quick:
        q = data.get("quick")
        if q is None:
            raise StudyError(f"{where}: --quick: the file has no [quick] table")
        study, base, ft, ev = dict(study), dict(base), dict(ft), dict(ev)
        for key, (table, into) in {
            "seeds": (study, "seeds"),
            "background_batches": (base, "background_batches"),
            "limit": (ev, "limit"),
            "every": (ev, "every"),
            "out": (study, "out"),
        }.items():
            if key in q:
                table[into] = q[key]
        if "out" not in q and "out" in study:
            study["out"] = f"{study['out']}-quick"
        for key, table in (("pretrain_overrides", base), ("finetune_overrides", ft)):
            extra = _str_list(where, f"quick.{key}", q.get(key, []))
            field_name = key if key == "pretrain_overrides" else "overrides"
            table[field_name] = _str_list(where, f"{key}", table.get(field_name, [])) + extra

    def need(table: dict, section: str, key: str) -> Any:
        if key not in table:
            raise StudyError(f"{where}: missing {section}.{key}")
        return table[key]

    seeds = _int_list(where, "study.seeds", study.get("seeds", [0]))
    if not seeds:
        raise StudyError(f"{where}: study.seeds is empty")
    checkpoint, recipe = base.get("checkpoint"), base.get("pretrain_config")
    if (checkpoint is None) == (recipe is None):
        raise StudyError(f"{where}: [base] needs exactly one of checkpoint or pretrain_config")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise StudyError(f"{where}: base.checkpoint {checkpoint} is not a checkpoint folder")
    if recipe is not None and not Path(recipe).is_file():
        raise StudyError(f"{where}: base.pretrain_config {recipe} not found")
    finetune_config = Path(need(ft, "finetune", "config"))
    if not finetune_config.is_file():
        raise StudyError(f"{where}: finetune.config {finetune_config} not found")
    spec = StudySpec(
        path=path,
        name=str(need(study, "study", "name")),
        out=Path(need(study, "study", "out")),
        seeds=seeds,
        base_checkpoint=Path(checkpoint) if checkpoint else None,
        pretrain_config=Path(recipe) if recipe else None,
        pretrain_overrides=_str_list(where, "base.pretrain_overrides", base.get("pretrain_overrides", [])),
        background_batches=_positive(where, "base.background_batches", base.get("background_batches", 1000)),
        finetune_config=finetune_config,
        finetune_overrides=_str_list(where, "finetune.overrides", ft.get("overrides", [])),
        eval_tasks=_str_list(where, "eval.tasks", need(ev, "eval", "tasks")),
        eval_every=_positive(where, "eval.every", ev.get("every", 0), allow_zero=True),
        eval_limit=_positive(where, "eval.limit", ev.get("limit", 100)),
        eval_data_dir=ev.get("data_dir"),
        learning=_metric(where, "eval.learning", need(ev, "eval", "learning")),
        forgetting=[_metric(where, "eval.forgetting", m) for m in _str_list(where, "eval.forgetting",
                                                                             need(ev, "eval", "forgetting"))],
        show=[_metric(where, "eval.show", m) for m in _str_list(where, "eval.show", ev.get("show", []))],
    )  # fmt: skip
    if not spec.eval_tasks:
        raise StudyError(f"{where}: eval.tasks is empty")
    if not spec.forgetting:
        raise StudyError(f"{where}: eval.forgetting is empty")
    arms = data.get("arm", [])
    if not isinstance(arms, list) or not arms:
        raise StudyError(f"{where}: no [[arm]] tables (nothing to compare)")
    for i, table in enumerate(arms):
        spec.arms += _expand_arm(where, i, table, seeds)
    names = [a.name for a in spec.arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"{where}: arms repeat: {', '.join(dupes[:3])}")
    return spec


def with_base(spec: StudySpec, checkpoint: str | Path) -> StudySpec:
    """The study started from an existing checkpoint instead of its [base] (`--base`)."""
    if not Path(checkpoint).is_dir():
        raise StudyError(f"--base: {checkpoint} is not a checkpoint folder")
    spec.base_checkpoint, spec.pretrain_config, spec.pretrain_overrides = Path(checkpoint), None, []
    return spec


def _expand_arm(where: str, i: int, table: dict, seeds: list[int]) -> list[Arm]:
    """One [[arm]] table -> the cartesian product of its sweep lists, times the seeds."""
    method = table.get("method")
    if method not in SWEEP_KEYS:
        raise StudyError(f"{where}: arm {i}: unknown method {method!r} (known: {', '.join(SWEEP_KEYS)})")
    sweeps: list[tuple[str, list[Any]]] = []
    for key, value in table.items():
        if key == "method":
            continue
        if key not in SWEEP_KEYS[method]:
            known = ", ".join(SWEEP_KEYS[method])
            raise StudyError(f"{where}: arm {i} ({method}): unknown key {key!r} (known: {known})")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise StudyError(f"{where}: arm {i} ({method}): empty sweep for {key!r}")
        sweeps.append((key, values))
    out = []
    for combo in itertools.product(*(v for _, v in sweeps)):
        params = tuple(zip((k for k, _ in sweeps), combo))
        out += [Arm(method, params, seed) for seed in seeds]
    return out


def _metric(where: str, key: str, text: Any) -> MetricRef:
    if not isinstance(text, str) or text.count(":") < 1:
        raise StudyError(f"{where}: {key}: expected 'task:metric', got {text!r}")
    task, _, metric = text.rpartition(":")
    return MetricRef(task, metric)


def _str_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: {key}: expected a list of strings, got {value!r}")
    return list(value)


def _int_list(where: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise StudyError(f"{where}: {key}: expected a list of integers, got {value!r}")
    return list(value)


def _positive(where: str, key: str, value: Any, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise StudyError(f"{where}: {key}: expected a {'non-negative' if allow_zero else 'positive'} integer")
    return value
