"""What a study's `[eval] tasks` make, known before anything runs: the task names each spec gives (the
names `task:metric` templates start with), the metrics each can be read for, and the local files it reads.

The metric names mirror the task classes of `titan_mem/eval/tasks.py`, which state them only inside their
`evaluate` (`TaskOutput.add` and each prediction's scores); tests/unit/test_study_task_metrics.py runs
every task of `BUILDERS` on a stub model and checks this table against what it logs. What only a run knows
is not checked here: an empty synthetic population (e.g. no untaught new people) and a hub dataset's
reachability.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from titan_mem.eval.task_context import TaskContext, task_options
from titan_mem.eval.tasks import BUILDERS, POPULATIONS, SOURCES

QA_TASKS = ("triviaqa", "nq_open", "simpleqa")  # generative QA from a file or the hub
SYNTHETIC = ("synthetic_qa", "synthetic_completion", "synthetic_prose", "synthetic_copy")
_QA = frozenset({"em", "f1", "answer_nll"})
_PPL = frozenset({"nll", "ppl", "bits_per_byte"})
# task -> (the metrics it logs: aggregates, the metrics each item carries: what the analysis resamples)
METRICS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    **{name: (_QA, _QA) for name in QA_TASKS},
    "gsm8k": (frozenset({"nll", "ppl"}), frozenset({"nll"})),
    "hellaswag": (frozenset({"acc", "acc_norm"}), frozenset({"acc", "acc_norm"})),
    "lambada_openai": (frozenset({"acc", "ppl"}), frozenset({"acc", "logprob"})),
    "perplexity": (_PPL, frozenset({"nll"})),
    "synthetic_qa": (_QA, _QA),
    "synthetic_completion": (_QA, _QA),
    "synthetic_prose": (_PPL, frozenset({"nll"})),
    "synthetic_copy": (frozenset({"em", "answer_nll"}), frozenset({"em", "answer_nll"})),
}
# file names that make a source a local file (as the data layer decides: `data/record_files.py`,
# `data/sources.py`); anything else that does not exist is a hub dataset name
_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz", ".zst", ".txt")


class TaskSpecError(ValueError):
    """One task spec that cannot run (the caller names the file and key)."""


@dataclass(frozen=True)
class TaskSpec:
    """One `TASK[:SOURCE][@option=value...]` of eval.tasks."""

    text: str
    name: str
    source: str | None
    label: str
    generate: bool

    def outputs(self) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
        """Each task name this spec makes -> (aggregate metrics, per-item metrics)."""
        if self.name in ("synthetic_qa", "synthetic_completion"):  # one task per population
            names = [f"{self.name}/{p}" for p in POPULATIONS]
        elif self.name == "perplexity":
            names = [f"perplexity:{self.source}"]
        else:
            names = [self.name]
        agg, items = METRICS[self.name]
        if self.name in QA_TASKS and not self.generate:  # @generate=0: the answer NLL only
            agg = items = frozenset({"answer_nll"})
        suffix = f"/{self.label}" if self.label else ""
        return {n + suffix: (agg, items) for n in names}

    def files(self, data_dir: Path | None) -> list[Path]:
        """The local files this task reads that must exist: its explicit source when that is a local path
        (not a hub name), else its file in `data_dir` when one is given."""
        if self.source is not None:
            path = local_source(self.source)
            return [] if path is None else [path]
        if self.name in SOURCES and data_dir is not None:
            return [data_dir / SOURCES[self.name].local]
        return []


def parse_task(text: str) -> TaskSpec:
    """A task spec, checked as `build_tasks` would check it before loading anything."""
    try:
        spec, ctx, label = task_options(text, TaskContext())
    except ValueError as e:  # TaskError: a bad @option
        raise TaskSpecError(str(e)) from None
    name, _, source = spec.partition(":")
    if name not in BUILDERS:
        raise TaskSpecError(f"unknown task {name!r} (known: {', '.join(BUILDERS)})")
    if name not in METRICS:  # a new task in eval/tasks.py: add its metrics to METRICS
        raise TaskSpecError(f"task {name!r}: the study does not know its metrics")
    if source and name in SYNTHETIC:
        raise TaskSpecError(f"{name} takes its items from the run's synthetic world, not a source")
    if not source and name == "perplexity":
        raise TaskSpecError("perplexity needs a source, e.g. perplexity:../shared/data/c4_sample_01.json.gz")
    return TaskSpec(text, name, source or None, label, ctx.generate)


def local_source(source: str) -> Path | None:
    """The local path (file, folder or glob) a source names; None for a hub dataset name."""
    path = Path(source).expanduser()
    if path.exists() or set("*?[") & set(source):
        return path
    if source.startswith((".", "/", "~")) or path.suffix in _LOCAL_SUFFIXES:
        return path
    return None


def exists(path: Path) -> bool:
    """A file or folder, or a glob that matches something."""
    text = str(path)
    return path.exists() or (bool(set("*?[") & set(text)) and bool(glob.glob(text, recursive=True)))
