"""What `load_study` (and so `--dry-run`) checks of a study file besides its structure, so that a run does
not fail after hours of training on something the file already said: the type of every key, the tasks
`[eval] tasks` names (the task registry and its `@option` syntax), the `task:metric` templates against what
those tasks make (`study/task_metrics.py`), the paths that must exist (`[eval] data_dir`, each task's
local file) and the outputs that must be creatable (`out`, `results`, the facts files). Each failure is one
StudyError line naming the file, the key and the value. Nothing is written: a folder's writability is
asked of the OS (`os.access`), not probed with a file.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any

from titan_mem.config import read_toml
from titan_mem.config_fields import section_types
from titan_mem.errors import ConfigError
from titan_mem.study.checks import positive, typed
from titan_mem.study.keys import SECTIONS, StudyError
from titan_mem.study.task_metrics import QA_TASKS, TaskSpecError, exists, parse_task

POS, NONNEG = "positive", "non-negative"  # integers checked by checks.positive (its words)
_KEYS: dict[str, dict[str, Any]] = {
    "study": {"name": str, "out": str, "seeds": list[int], "base_seeds": list[int], "pair_seeds": bool,
              "results": str},
    "base": {"checkpoint": str, "pretrain_config": str, "study": str, "hf_model": str,
             "pretrain_overrides": list[str], "background_batches": POS, "background": str, "reference": str},
    "facts": {"task": str, "source": str, "candidates": POS, "shots": NONNEG, "splits": dict, "seed": NONNEG,
              "out": str, "ids": str, "known": dict},
    "facts.known": {"task": str, "source": str, "candidates": POS, "count": POS, "min_f1": float},
    "finetune": {"overrides": list[str]},
    "eval": {"tasks": list[str], "points": NONNEG, "every": NONNEG, "limit": POS, "data_dir": str,
             "shots": NONNEG, "shots_seed": NONNEG, "learning": str, "control": str, "learning_f1": str,
             "control_f1": str, "forgetting": list[str], "show": list[str], "levels": POS, "bootstrap": POS},
    "quick": {"seeds": list[int], "base_seeds": list[int], "pretrain_overrides": list[str],
              "finetune_overrides": list[str], "background_batches": POS, "limit": POS, "points": NONNEG,
              "forgetting": list[str], "max_sweep": POS, "out": str, "heal_overrides": list[str],
              "every": NONNEG, "tasks": list[str]},
    "geometry": {"name": str, "overrides": list[str], "arm_overrides": list[str], "retrofit": list[str],
                 "heal_config": str, "heal_overrides": list[str]},
    "method": {"config": str, "overrides": list[str]},
    "arm": {"method": str, "group": str, "label": str, "background": str, "geometries": list[str],
            "start": str},
}  # fmt: skip
# strings that name a path or a thing: an empty one is refused (out = "" would write into the working dir)
_NAMES = {"study.name", "study.out", "study.results", "base.checkpoint", "base.pretrain_config", "base.study",
          "base.hf_model", "facts.source", "facts.out", "facts.ids", "facts.known.source", "eval.data_dir",
          "quick.out", "config", "heal_config", "method", "name"}  # fmt: skip
_SEEDS = ("study.seeds", "study.base_seeds", "quick.seeds", "quick.base_seeds")
# under --quick, these keys hold the [quick] table's value: an error names where the value came from
QUICK_MOVES = {"study.seeds": "seeds", "study.base_seeds": "base_seeds", "study.out": "out",
               "eval.limit": "limit", "eval.points": "points", "eval.every": "every",
               "eval.forgetting": "forgetting", "eval.tasks": "tasks"}  # fmt: skip


def check_sections(where: str, data: dict[str, Any]) -> None:
    """Every section and key is one the study knows."""
    for name, table in data.items():
        if name in ("arm", "geometry"):
            continue
        if name not in SECTIONS:
            known = ", ".join([*SECTIONS, "geometry", "arm"])
            raise StudyError(f"{where}: unknown section [{name}] (known: {known})")
        if not isinstance(table, dict):
            raise StudyError(f"{where}: '{name}' must be a [section]")
        if name == "method":
            continue
        for key in table:
            if key not in SECTIONS[name]:
                raise StudyError(f"{where}: unknown key {name}.{key}")


def _check_table(where: str, kind: str, prefix: str, table: dict[str, Any]) -> None:
    for key, tp in _KEYS[kind].items():
        if key not in table:
            continue
        name, value = f"{prefix}.{key}", table[key]
        if tp in (POS, NONNEG):
            positive(where, name, value, allow_zero=tp == NONNEG)
        elif tp is dict:
            if not isinstance(value, dict):
                raise StudyError(f"{where}: {name}: expected a table; got {value!r}")
        else:
            typed(where, name, tp, value)
        if tp is str and not value.strip() and (name in _NAMES or key in _NAMES):
            raise StudyError(f"{where}: {name}: must not be empty")
        if name in _SEEDS and any(s < 0 for s in value):
            raise StudyError(f"{where}: {name}: seeds must be non-negative; got {value}")


def _tables(where: str, data: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The [[kind]] tables (a list of tables), or one line naming what is not one."""
    tables = data.get(kind, [])
    if not isinstance(tables, list):
        raise StudyError(f"{where}: '{kind}' must be [[{kind}]] tables; got {tables!r}")
    for i, t in enumerate(tables):
        if not isinstance(t, dict):
            raise StudyError(f"{where}: {kind} {i}: expected a [[{kind}]] table; got {t!r}")
    return tables


def check_types(where: str, data: dict[str, Any]) -> None:
    """The type of every key of every section (before any key is used): one line naming the key."""
    for section in ("study", "base", "facts", "finetune", "eval", "quick"):
        _check_table(where, section, section, data.get(section, {}))
    known = data.get("facts", {}).get("known")
    if isinstance(known, dict):
        _check_table(where, "facts.known", "facts.known", known)
    for name, table in data.get("method", {}).items():
        if isinstance(table, dict):
            _check_table(where, "method", f"method.{name}", table)
    for i, t in enumerate(_tables(where, data, "geometry")):
        _check_table(where, "geometry", f"geometry {t.get('name', i)}", t)
    for i, t in enumerate(_tables(where, data, "arm")):
        _check_table(where, "arm", f"arm {i}", t)
        if t.get("geometries") == []:
            raise StudyError(f"{where}: arm {i}.geometries: empty (the arm would run nowhere)")


@cache
def _config_types() -> dict[str, Any]:
    from titan_mem.config import Config

    cfg = Config()
    return {f"{s}.{k}": tp for s in vars(cfg) for k, tp in section_types(type(getattr(cfg, s))).items()}


def check_sweep(where: str, arm: str, key: str, target: str, values: list[Any]) -> None:
    """Each value of a sweep key has the type of the trainer key it sets (its choices included); the
    values themselves are kept as written (they name the arm's folder)."""
    for value in values:
        typed(where, f"{arm}.{key}", _config_types()[target], value)


def check_base_study(where: str, path: Path, other: str) -> None:
    """[base] study names another study file, which takes its bases from no other (no chain, no cycle)."""
    if not Path(other).is_file():
        raise StudyError(f"{where}: base.study: {other!r} is not a file")
    if Path(other).resolve() == path.resolve():
        raise StudyError(f"{where}: base.study: {other!r} is this study itself")
    try:
        theirs = read_toml(Path(other), "study").get("base", {})
    except ConfigError as e:  # not valid TOML
        raise StudyError(f"{where}: base.study: {e}") from None
    if isinstance(theirs, dict) and "study" in theirs:
        raise StudyError(f"{where}: base.study {other} takes its bases from another study itself")


def check_study(where: str, spec: Any, quick_keys: Collection[str] = ()) -> None:
    """What only the whole file says: tasks, metrics, paths to read and outputs to write (see the module's
    docstring). `spec` is the StudySpec just read; `quick_keys`: the [quick] keys that set its values."""

    def name(key: str) -> str:
        moved = QUICK_MOVES.get(key)
        return f"quick.{moved} ({key} under --quick)" if moved in quick_keys else key

    for key, path in (("study.out", spec.out), ("study.results", spec.results)):
        if path is not None:
            _creatable(where, name(key), path)
    if spec.facts is not None:
        _creatable(where, "facts.out", spec.facts.out)
        _creatable(where, "facts.ids", spec.facts.ids.parent)
        for key, task in (
            ("facts.task", spec.facts.task),
            ("facts.known.task", getattr(spec.facts.known, "task", None)),
        ):
            if task is not None and task not in QA_TASKS:
                raise StudyError(f"{where}: {key}: {task!r} is not a QA task ({', '.join(QA_TASKS)})")
    data_dir = Path(spec.eval_data_dir) if spec.eval_data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise StudyError(f"{where}: eval.data_dir: {spec.eval_data_dir!r} is not a folder")
    made: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for text in spec.eval_tasks:
        try:
            task = parse_task(text)
        except TaskSpecError as e:
            raise StudyError(f"{where}: {name('eval.tasks')}: {text!r}: {e}") from None
        for path in task.files(data_dir):
            if not exists(path) and not _made_by_study(spec, path):
                raise StudyError(f"{where}: {name('eval.tasks')}: {text!r}: {path} not found")
        for task_name, metrics in task.outputs().items():
            if task_name in made:
                twice = f"a second task named {task_name!r} (give one @label=NAME)"
                raise StudyError(f"{where}: {name('eval.tasks')}: {text!r}: {twice}")
            made[task_name] = metrics
    for key in ("learning", "control", "learning_f1", "control_f1"):
        ref = getattr(spec, key)
        if ref is not None:
            _check_metric(where, f"eval.{key}", str(ref), str(ref), made, per_item=False)
    for ref in spec.show:
        _check_metric(where, "eval.show", str(ref), str(ref), made, per_item=False)
    for template in spec.forgetting:  # resampled per item, on each split a "{split}" names
        for split in ("val", "test") if "{split}" in template else ("",):
            filled = template.replace("{split}", split)
            _check_metric(where, name("eval.forgetting"), template, filled, made, per_item=True)


def _check_metric(where: str, key: str, template: str, text: str, made: dict, per_item: bool) -> None:
    task, _, metric = text.rpartition(":")
    if task not in made:
        tasks = ", ".join(made)
        raise StudyError(
            f"{where}: {key}: {template!r}: eval.tasks make no task {task!r} (they make: {tasks})"
        )
    agg, items = made[task]
    allowed = items if per_item else agg | items
    if metric not in allowed:
        what, why = ("per-item metric", "the analysis resamples items; ") if per_item else ("metric", "")
        raise StudyError(f"{where}: {key}: {template!r}: {task} has no {what} {metric!r} "
                         f"({why}it has: {', '.join(sorted(allowed))})")  # fmt: skip


def _made_by_study(spec: Any, path: Path) -> bool:
    """A file the study writes itself before the tasks read it: the [facts] files."""
    return spec.facts is not None and path.resolve().is_relative_to(spec.facts.out.resolve())


def _creatable(where: str, key: str, path: Path) -> None:
    """A folder that exists, or whose nearest existing parent is a folder this process may write."""
    if path.exists():
        if not path.is_dir():
            raise StudyError(f"{where}: {key}: {str(path)!r} is a file, not a folder")
        existing = path
    else:
        existing = path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StudyError(f"{where}: {key}: {str(path)!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{where}: {key}: {str(path)!r} cannot be written: {existing} is not writable")
