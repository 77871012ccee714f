"""A study file (`studies/*.toml`): the bases, the methods' own finetuning configs, the stream, the held-out
evaluation and the arms (method x sweep x base seed x order seed), read into plain records. Every key is
known; anything else is a one-line error naming the file and key. docs/design.md, "The study", says why each
part exists (own configs, equal budgets, validation/test, specific learning, seeds that vary the base).

    [study]      name, out (folder), seeds = [0, 1] (fact order), base_seeds = [0, 1] (bases pretrained
                 with different seeds), pair_seeds = true (run sets zip the two lists instead of crossing),
                 results = "docs/results/x" (a small JSON per finished evaluation and arm, to commit)
    [base]       checkpoint = "RUN/checkpoints/step-N"  | pretrain_config = "train_configs/x.toml"
                 | study = "studies/other.toml" (that study's bases: its recipe, folders and geometries)
                 | hf_model = "folder or org/name" (a pretrained HF model; keys.STARTS, keys.REFERENCES)
                 reference = "healed" | "hf", pretrain_overrides = [...], background_batches = 1000,
                 background = "pretrain" | "finetune" | "heldout" (the data the background counts read)
    [[geometry]] name = "1M", overrides = ["--model.memory_n_keys=1024", ...] (model keys: every run),
                 arm_overrides = ["--finetune.top_t=500"] (finetuning runs only; a sweep key wins);
                 a retrofit: retrofit = [...], heal_config, heal_overrides (Geometry says how)
    [method.X]   config = "train_configs/debug_full_finetune.toml", overrides = [...]: method X's own
                 optimizer, schedule, clipping; its training.mode decides the sweep keys
    [finetune]   overrides = [...] (the stream, shared by every method: data, steps)
    [eval]       tasks, points = 8 (log-spaced evaluation steps) | every = N, limit, data_dir, shots = 0
                 and shots_seed = 0 (few-shot QA/GSM8K exemplars, titan_mem/eval/fewshot.py),
                 learning, control, learning_f1, control_f1, forgetting (templates, "{split}" = val|test),
                 show, levels = 5, bootstrap = 1000
    [facts]      new facts the hf_model gets wrong, from its own answers (study/facts.py)
    [[arm]]      method = "X", group = "headline" (series are compared within a group), label = "tf" (the
                 series; default the method), geometries = [...] (default all), background = "finetune"
                 (other counts), start = "hf" (keys.STARTS), then sweep keys, each a value or a list
    [quick]      what `--quick` changes: seeds, base_seeds, pretrain / finetune / heal_overrides
                 (appended), background_batches, tasks, limit, points, every, forgetting (a smoke base may
                 score 0 where relative forgetting has no scale), max_sweep (first N of each sweep list,
                 every method alike), out (default: <out>-quick)"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_mem.config import read_toml
from titan_mem.errors import ConfigError
from titan_mem.study.checks import choice, int_list, positive, str_list
from titan_mem.study.facts import FactsSpec, read_facts
from titan_mem.study.keys import (
    ARM_KEYS,
    BACKGROUNDS,
    HIGHER_IS_BETTER,
    REFERENCES,
    STARTS,
    StudyError,
    sweep_keys,
)
from titan_mem.study.validate import check_base_study, check_sections, check_study, check_sweep, check_types

__all__ = ["HIGHER_IS_BETTER", "Arm", "Geometry", "Method", "MetricRef", "StudyError", "StudySpec",
           "load_study"]  # fmt: skip


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
class Geometry:
    """One memory size: model overrides every run of it gets, and finetuning-only overrides (e.g. t). A
    retrofit (Goyal et al. 2026) pretrains a dense base with `overrides` (or takes [base] hf_model), exports
    it to HF format, retrofits it (`retrofit`: --retrofit.*, --model.memory_* keys), heals it with
    `heal_config`; later runs (counts, evaluation, arms) read the healed model."""

    name: str
    overrides: tuple[str, ...] = ()
    arm_overrides: tuple[str, ...] = ()
    retrofit: tuple[str, ...] = ()
    heal_config: Path | None = None
    heal_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A method's own finetuning config (optimizer, schedule, clipping) and its mode."""

    name: str
    config: Path
    mode: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    """One finetuning run: a method, one value per sweep key, a geometry, a base seed and an order seed."""

    method: str
    mode: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    base_seed: int = 0
    geometry: str = "default"
    group: str = "headline"
    background: str | None = None  # None = the study's [base] background
    label: str = ""  # the series the analysis compares (default: the method)
    start: str = ""  # keys.STARTS: "" = the geometry's base, "hf" = [base] hf_model as it is

    @property
    def series(self) -> str:
        return self.label or self.method

    @property
    def name(self) -> str:
        parts = [self.series, *(f"{k}{v}" for k, v in self.params), f"b{self.base_seed}", f"seed{self.seed}"]
        return "-".join(str(p).replace("/", "_") for p in parts)

    def overrides(self) -> list[str]:
        """The sweep's trainer overrides. The seed moves the fact order (`data.seed`) and any random init
        (`job.seed`); the synthetic world stays the base's (the stages pin `data.synthetic_seed`)."""
        keys = sweep_keys(self.mode)
        out = [f"--job.seed={self.seed}", f"--data.seed={self.seed}"]
        return out + [f"--{keys[k]}={v}" for k, v in self.params]


@dataclass
class StudySpec:
    path: Path
    name: str
    out: Path
    seeds: list[int]
    base_seeds: list[int]
    pair_seeds: bool
    base_checkpoint: Path | None
    pretrain_config: Path | None
    hf_model: str | None
    pretrain_overrides: list[str]
    background_batches: int
    background: str
    base_study: Path | None
    geometries: list[Geometry]
    methods: dict[str, Method]
    finetune_overrides: list[str]
    eval_tasks: list[str]
    eval_points: int
    eval_every: int
    eval_limit: int
    eval_data_dir: str | None
    eval_shots: int
    eval_shots_seed: int
    learning: MetricRef
    control: MetricRef | None
    learning_f1: MetricRef | None
    control_f1: MetricRef | None
    forgetting: list[str]
    show: list[MetricRef]
    levels: int = 5
    bootstrap: int = 1000
    arms: list[Arm] = field(default_factory=list)
    results: Path | None = None
    reference: str = "healed"
    facts: FactsSpec | None = None

    def run_sets(self) -> list[tuple[int, int]]:
        """(base seed, order seed) pairs every configuration runs with."""
        if self.pair_seeds:
            return list(zip(self.base_seeds, self.seeds))
        return [(b, s) for b in self.base_seeds for s in self.seeds]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(a.group for a in self.arms))

    def geometry(self, name: str) -> Geometry:
        return next(g for g in self.geometries if g.name == name)

    def forgetting_refs(self, split: str) -> list[MetricRef]:
        """The forgetting metrics of one split (val | test): `{split}` filled in."""
        return [_metric("", "eval.forgetting", t.replace("{split}", split)) for t in self.forgetting]


def _apply_quick(where: str, data: dict[str, Any]) -> int | None:
    """Fold the [quick] table into the others (in place); returns its max_sweep."""
    q = data.get("quick")
    if q is None:
        raise StudyError(f"{where}: --quick: the file has no [quick] table")
    study, base, ft, ev = (data.setdefault(s, {}) for s in ("study", "base", "finetune", "eval"))
    moves = {"seeds": study, "base_seeds": study, "out": study, "background_batches": base}
    moves |= {"limit": ev, "points": ev, "every": ev, "forgetting": ev, "tasks": ev}
    shorter = str_list(where, "quick.heal_overrides", q.get("heal_overrides", []))
    for g in (g for g in data.get("geometry", []) if "retrofit" in g):  # a shorter heal
        g["heal_overrides"] = [*g.get("heal_overrides", []), *shorter]
    for key, table in moves.items():
        if key in q:
            table[key] = q[key]
    if "out" not in q and "out" in study:
        study["out"] = f"{study['out']}-quick"
    study.pop("results", None)  # a smoke run's numbers are not the study's: nothing to commit
    for key, table, into in (("pretrain_overrides", base, "pretrain_overrides"),
                             ("finetune_overrides", ft, "overrides")):  # fmt: skip
        extra = str_list(where, f"quick.{key}", q.get(key, []))
        table[into] = str_list(where, key, table.get(into, [])) + extra
    max_sweep = q.get("max_sweep")
    if max_sweep is not None:
        positive(where, "quick.max_sweep", max_sweep)
    return max_sweep


def load_study(path: str | Path, quick: bool = False) -> StudySpec:
    """Read and check a study file; relative paths are relative to the working directory (the repo root).
    `quick`: apply the file's [quick] table (a few-minute version of the same study)."""
    path = Path(path)
    try:
        data = read_toml(path, "study")
    except ConfigError as e:
        raise StudyError(str(e)) from None
    where = str(path)
    check_sections(where, data)
    check_types(where, data)  # every key's type, before any is used
    quick_keys = set(data.get("quick", {})) if quick else set()
    max_sweep = _apply_quick(where, data) if quick else None
    study, base = data.get("study", {}), data.get("base", {})
    ft, ev = data.get("finetune", {}), data.get("eval", {})

    def need(table: dict, section: str, key: str) -> Any:
        if key not in table:
            raise StudyError(f"{where}: missing {section}.{key}")
        return table[key]

    seeds = int_list(where, "study.seeds", study.get("seeds", [0]))
    base_seeds = int_list(where, "study.base_seeds", study.get("base_seeds", [0]))
    for key, value in (("study.seeds", seeds), ("study.base_seeds", base_seeds)):
        if not value or len(set(value)) != len(value):
            raise StudyError(f"{where}: {key} must be a non-empty list without repeats")
    if study.get("pair_seeds") and len(seeds) != len(base_seeds):
        raise StudyError(f"{where}: study.pair_seeds: seeds and base_seeds must have the same length")
    checkpoint, recipe, other = base.get("checkpoint"), base.get("pretrain_config"), base.get("study")
    hf_model = base.get("hf_model")
    if sum(x is not None for x in (checkpoint, recipe, other, hf_model)) != 1:
        raise StudyError(f"{where}: [base] needs one of checkpoint, pretrain_config, study or hf_model")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise StudyError(f"{where}: base.checkpoint {checkpoint} is not a checkpoint folder")
    if checkpoint is not None and len(base_seeds) > 1:
        raise StudyError(f"{where}: study.base_seeds: one given base.checkpoint cannot have several seeds")
    geometries = _geometries(where, data.get("geometry", []))
    if other is not None:
        check_base_study(where, path, other)  # a file, not this one, that borrows no bases itself
        shared = load_study(other, quick=quick)
        recipe, checkpoint = shared.pretrain_config, shared.base_checkpoint
        base = {**base, "pretrain_overrides": shared.pretrain_overrides}
        known = {g.name: g for g in shared.geometries}
        for g in geometries:
            if g.name not in known or known[g.name].overrides != g.overrides:
                raise StudyError(
                    f"{where}: geometry {g.name!r} is not one of {other}'s (same name and model)"
                )
        if not set(base_seeds) <= set(shared.base_seeds):
            raise StudyError(f"{where}: study.base_seeds {base_seeds}: {other} has bases {shared.base_seeds}")
    if recipe is not None and not Path(recipe).is_file():
        raise StudyError(f"{where}: base.pretrain_config {recipe} not found")
    if recipe is None and hf_model is None and any(g.retrofit for g in geometries):
        raise StudyError(f"{where}: a retrofit geometry needs base.pretrain_config or base.hf_model")
    if hf_model is not None and any(g.overrides for g in geometries if not g.retrofit):
        raise StudyError(f"{where}: base.hf_model: a geometry without retrofit keys runs the model as it is "
                         "(no --model.* overrides)")  # fmt: skip
    background = choice(where, "base.background", base.get("background", "pretrain"), BACKGROUNDS)
    reference = choice(where, "base.reference", base.get("reference", "healed"), REFERENCES)
    if reference == "hf" and hf_model is None:
        raise StudyError(f"{where}: base.reference = 'hf' needs base.hf_model")
    facts = read_facts(where, data.get("facts"))
    if facts is not None and hf_model is None:
        raise StudyError(f"{where}: [facts] are chosen by base.hf_model's answers; the study has none")
    spec = StudySpec(
        path=path,
        name=str(need(study, "study", "name")),
        out=Path(need(study, "study", "out")),
        seeds=seeds,
        base_seeds=base_seeds,
        pair_seeds=bool(study.get("pair_seeds", False)),
        base_checkpoint=Path(checkpoint) if checkpoint else None,
        pretrain_config=Path(recipe) if recipe else None,
        hf_model=str(hf_model) if hf_model is not None else None,
        pretrain_overrides=str_list(where, "base.pretrain_overrides", base.get("pretrain_overrides", [])),
        background_batches=positive(where, "base.background_batches", base.get("background_batches", 1000)),
        background=background,
        base_study=Path(other) if other else None,
        geometries=geometries,
        methods=_methods(where, data.get("method")),
        finetune_overrides=str_list(where, "finetune.overrides", ft.get("overrides", [])),
        eval_tasks=str_list(where, "eval.tasks", need(ev, "eval", "tasks")),
        eval_points=positive(where, "eval.points", ev.get("points", 0), allow_zero=True),
        eval_every=positive(where, "eval.every", ev.get("every", 0), allow_zero=True),
        eval_limit=positive(where, "eval.limit", ev.get("limit", 100)),
        eval_data_dir=ev.get("data_dir"),
        eval_shots=positive(where, "eval.shots", ev.get("shots", 0), allow_zero=True),
        eval_shots_seed=positive(where, "eval.shots_seed", ev.get("shots_seed", 0), allow_zero=True),
        learning=_metric(where, "eval.learning", need(ev, "eval", "learning")),
        control=_optional_metric(where, ev, "control"),
        learning_f1=_optional_metric(where, ev, "learning_f1"),
        control_f1=_optional_metric(where, ev, "control_f1"),
        forgetting=str_list(where, "eval.forgetting", need(ev, "eval", "forgetting")),
        show=[_metric(where, "eval.show", m) for m in str_list(where, "eval.show", ev.get("show", []))],
        levels=positive(where, "eval.levels", ev.get("levels", 5)),
        bootstrap=positive(where, "eval.bootstrap", ev.get("bootstrap", 1000)),
        results=Path(study["results"]) if study.get("results") else None,
        reference=reference,
        facts=facts,
    )  # fmt: skip
    if not spec.eval_tasks or not spec.forgetting:
        raise StudyError(f"{where}: eval.tasks and eval.forgetting must not be empty")
    if spec.eval_points and spec.eval_every:
        raise StudyError(f"{where}: eval: give points (log-spaced) or every, not both")
    for t in spec.forgetting:
        _metric(where, "eval.forgetting", t.replace("{split}", "val"))
    arms = data.get("arm", [])
    if not isinstance(arms, list) or not arms:
        raise StudyError(f"{where}: no [[arm]] tables (nothing to compare)")
    for i, table in enumerate(arms):
        spec.arms += _expand_arm(where, i, table, spec, max_sweep)
    names = [(a.geometry, a.group, a.name) for a in spec.arms]
    dupes = sorted({"/".join(n) for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"{where}: arms repeat: {', '.join(dupes[:3])}")
    _check_budget(where, spec)
    check_study(where, spec, quick_keys)  # tasks, metrics, paths to read, outputs to write
    return spec


def eval_steps(spec: StudySpec, steps: int) -> list[int]:
    """The finetuning steps evaluated: `points` log-spaced steps from 1 to `steps` (the last included),
    since learning and forgetting move fastest early; or every `every` steps; or only the last."""
    if spec.eval_points:
        n = spec.eval_points
        raw = {max(1, round(math.exp(math.log(steps) * i / max(n - 1, 1)))) for i in range(n)}
        return sorted(raw | {steps})
    if spec.eval_every:
        return sorted(set(range(spec.eval_every, steps + 1, spec.eval_every)) | {steps})
    return [steps]


def _geometries(where: str, tables: Any) -> list[Geometry]:
    if not isinstance(tables, list):
        raise StudyError(f"{where}: 'geometry' must be [[geometry]] tables")
    if not tables:
        return [Geometry("default")]
    out = []
    for i, t in enumerate(tables):
        unknown = set(t) - {"name", "overrides", "arm_overrides", "retrofit", "heal_config", "heal_overrides"}
        if unknown:
            raise StudyError(f"{where}: geometry {i}: unknown key {sorted(unknown)[0]!r}")
        if not isinstance(t.get("name"), str) or not t["name"].replace("_", "").isalnum():
            raise StudyError(f"{where}: geometry {i}: name must be a short word, got {t.get('name')!r}")
        over = str_list(where, f"geometry {t['name']}.overrides", t.get("overrides", []))
        if any(not o.startswith("--model.") for o in over):
            raise StudyError(
                f"{where}: geometry {t['name']}.overrides: only --model.* keys (the memory size)"
            )
        arm_over = str_list(where, f"geometry {t['name']}.arm_overrides", t.get("arm_overrides", []))
        out.append(Geometry(t["name"], tuple(over), tuple(arm_over), *_retrofit(where, t)))
    if len({g.name for g in out}) != len(out):
        raise StudyError(f"{where}: geometry names repeat")
    return out


def _retrofit(where: str, t: dict) -> tuple[tuple[str, ...], Path | None, tuple[str, ...]]:
    """A geometry's `retrofit` overrides and heal recipe (both or none)."""
    name, heal = t["name"], t.get("heal_config")
    retrofit = str_list(where, f"geometry {name}.retrofit", t.get("retrofit", []))
    heal_over = str_list(where, f"geometry {name}.heal_overrides", t.get("heal_overrides", []))
    if bool(retrofit) != (heal is not None) or (heal_over and not retrofit):
        raise StudyError(f"{where}: geometry {name}: retrofit and heal_config go together")
    if any(not o.startswith(("--retrofit.", "--model.memory_")) for o in retrofit):
        raise StudyError(f"{where}: geometry {name}.retrofit: only --retrofit.* and --model.memory_* keys")
    if heal is not None and not (isinstance(heal, str) and Path(heal).is_file()):
        raise StudyError(f"{where}: geometry {name}.heal_config: {heal!r} is not a file")
    return tuple(retrofit), Path(heal) if heal is not None else None, tuple(heal_over)


def _methods(where: str, tables: Any) -> dict[str, Method]:
    """[method.X] tables: each method's own config, checked to exist and read for its training.mode."""
    from titan_mem import config as config_mod

    if not isinstance(tables, dict) or not tables:
        raise StudyError(f"{where}: no [method.X] tables (each method needs its own finetuning config)")
    out = {}
    for name, t in tables.items():
        if not isinstance(t, dict):
            raise StudyError(f"{where}: method.{name} must be a table")
        unknown = set(t) - {"config", "overrides"}
        if unknown:
            raise StudyError(f"{where}: unknown key method.{name}.{sorted(unknown)[0]}")
        if "config" not in t:
            raise StudyError(f"{where}: missing method.{name}.config")
        path = Path(t["config"])
        if not path.is_file():
            raise StudyError(f"{where}: method.{name}.config {path} not found")
        overrides = str_list(where, f"method.{name}.overrides", t.get("overrides", []))
        try:
            mode = config_mod.parse_args([str(path), *overrides]).training.mode
        except ConfigError as e:
            raise StudyError(f"{where}: method.{name}: {e}") from None
        if mode == "pretrain":
            raise StudyError(f"{where}: method.{name}.config {path} is a pretraining config")
        out[name] = Method(name, path, mode, tuple(overrides))
    return out


def _expand_arm(where: str, i: int, table: dict, spec: StudySpec, max_sweep: int | None) -> list[Arm]:
    """One [[arm]] table -> the cartesian product of its sweep lists, times geometries and seeds."""
    method = table.get("method")
    if method not in spec.methods:
        raise StudyError(f"{where}: arm {i}: unknown method {method!r} (the [method.X] tables: "
                         f"{', '.join(spec.methods)})")  # fmt: skip
    mode = spec.methods[method].mode
    group = table.get("group", "headline")
    label = table.get("label", "")
    if not isinstance(group, str) or not isinstance(label, str):
        raise StudyError(f"{where}: arm {i}: group and label must be strings")
    background = table.get("background")
    if background is not None and background not in BACKGROUNDS:
        raise StudyError(f"{where}: arm {i}: background: expected one of {', '.join(BACKGROUNDS)}")
    start = choice(where, f"arm {i}.start", table.get("start", ""), STARTS)
    if start == "hf" and (spec.hf_model is None or mode == "sparse_finetune"):
        raise StudyError(f"{where}: arm {i}: start = 'hf' runs base.hf_model without memory: it needs "
                         "base.hf_model and a dense method (full or LoRA)")  # fmt: skip
    geometries = table.get("geometries", [g.name for g in spec.geometries])
    for g in str_list(where, f"arm {i}.geometries", geometries):
        if g not in {x.name for x in spec.geometries}:
            raise StudyError(f"{where}: arm {i}: unknown geometry {g!r}")
    keys = sweep_keys(mode)
    sweeps: list[tuple[str, list[Any]]] = []
    for key, value in table.items():
        if key in ARM_KEYS:
            continue
        if key not in keys:
            raise StudyError(f"{where}: arm {i} ({method}): unknown key {key!r} (known: {', '.join(keys)})")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise StudyError(f"{where}: arm {i} ({method}): empty sweep for {key!r}")
        check_sweep(where, f"arm {i} ({method})", key, keys[key], values)
        sweeps.append((key, values[:max_sweep] if max_sweep else values))
    out = []
    for geometry in geometries:
        for combo in itertools.product(*(v for _, v in sweeps)):
            params = tuple(zip((k for k, _ in sweeps), combo))
            out += [
                Arm(method, mode, params, seed, base_seed, geometry, group, background, label, start)
                for base_seed, seed in spec.run_sets()
            ]
    return out


def _check_budget(where: str, spec: StudySpec) -> None:
    """Every method of a group gets the same number of configurations per geometry (a front is the lower
    envelope of noisy points, so more points win by themselves: docs/design.md, 'Same budget')."""
    for geometry in spec.geometries:
        for group in spec.groups:
            configs: dict[str, set] = {}
            for a in spec.arms:
                if a.geometry == geometry.name and a.group == group:
                    configs.setdefault(a.series, set()).add(a.params)
            sizes = {m: len(c) for m, c in configs.items()}
            if len(set(sizes.values())) > 1:
                detail = ", ".join(f"{m} {n}" for m, n in sizes.items())
                raise StudyError(
                    f"{where}: group {group!r} at geometry {geometry.name}: methods have unequal search "
                    f"budgets ({detail} configurations); give every method the same number"
                )


def _optional_metric(where: str, table: dict, key: str) -> MetricRef | None:
    return _metric(where, f"eval.{key}", table[key]) if key in table else None


def _metric(where: str, key: str, text: Any) -> MetricRef:
    if not isinstance(text, str) or text.count(":") < 1:
        raise StudyError(f"{where}: {key}: expected 'task:metric', got {text!r}")
    task, _, metric = text.rpartition(":")
    return MetricRef(task, metric)
