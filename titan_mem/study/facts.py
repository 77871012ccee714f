"""A study's new facts on a real model (`[facts]`): QA items its [base] hf_model gets wrong, chosen once from
the base's own few-shot evaluation (titan_mem/eval/unknown_facts.py) and cut into named splits, e.g. the
taught facts and an untaught control of the same kind (Lin et al. 2025 teach TriviaQA facts the model does
not answer). The chosen ids go into the study's committed results folder, so a rerun on another machine
teaches the same facts even where its float rounding would have put a borderline item on the other side
of the median.

    [facts]  task = "triviaqa", source = "../shared/data/triviaqa_3k.jsonl", candidates = 600 (items the
             base answers), shots = 5, splits = {train = 100, control = 100}, seed = 0,
             out = "outputs/smollm2_triviaqa/facts" (<split>.jsonl, and <split>_eval.jsonl: the split
             then a few-shot exemplar pool; finetune and eval overrides name them), ids = "docs/results/
             x/facts.json" (the chosen ids, committed; default <out>/facts.json)
    [facts.known] task = "nq_open", source = "../shared/data/nq_open_dev.jsonl", candidates = 1200,
             count = 50, min_f1 = 0.5: held-out questions the base gets right (F1 >= min_f1), written as
             <out>/known_eval.jsonl (then an exemplar pool): forgetting read where there is something to
             forget (Lin et al. 2025 measure NQ F1; a 135M model answers 2 % of NQ, so F1 over random
             questions has almost nothing to lose)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_mem.study.checks import positive
from titan_mem.study.keys import StudyError

IDS_FILE = "facts.json"


@dataclass(frozen=True)
class KnownSpec:
    task: str
    source: str
    candidates: int
    count: int
    min_f1: float


@dataclass(frozen=True)
class FactsSpec:
    task: str
    source: str
    candidates: int
    shots: int
    splits: dict[str, int]
    seed: int
    out: Path
    ids: Path
    known: KnownSpec | None = None

    def split_file(self, name: str) -> Path:
        return self.out / f"{name}.jsonl"


def read_facts(where: str, table: Any) -> FactsSpec | None:
    """The [facts] table, checked (None when the study has none)."""
    if table is None:
        return None
    for key in ("task", "source", "splits", "out"):
        if key not in table:
            raise StudyError(f"{where}: missing facts.{key}")
    if not Path(table["source"]).is_file():
        raise StudyError(f"{where}: facts.source {table['source']} not found")
    splits = table["splits"]
    if not isinstance(splits, dict) or not splits:
        raise StudyError(f"{where}: facts.splits: expected a table of split = count, e.g. {{train = 100}}")
    for name, n in splits.items():
        if not name.replace("_", "").isalnum():
            raise StudyError(f"{where}: facts.splits: {name!r} is not a plain name")
        positive(where, f"facts.splits.{name}", n)
    return FactsSpec(
        task=str(table["task"]),
        source=str(table["source"]),
        candidates=positive(where, "facts.candidates", table.get("candidates", 600)),
        shots=positive(where, "facts.shots", table.get("shots", 0), allow_zero=True),
        splits=dict(splits),
        seed=positive(where, "facts.seed", table.get("seed", 0), allow_zero=True),
        out=Path(str(table["out"])),
        ids=Path(str(table.get("ids", Path(str(table["out"])) / IDS_FILE))),
        known=_known(where, table.get("known")),
    )


def _known(where: str, table: Any) -> KnownSpec | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise StudyError(f"{where}: facts.known must be a table")
    unknown = set(table) - {"task", "source", "candidates", "count", "min_f1"}
    if unknown:
        raise StudyError(f"{where}: unknown key facts.known.{sorted(unknown)[0]}")
    for key in ("task", "source"):
        if key not in table:
            raise StudyError(f"{where}: missing facts.known.{key}")
    if not Path(table["source"]).is_file():
        raise StudyError(f"{where}: facts.known.source {table['source']} not found")
    min_f1 = table.get("min_f1", 0.5)
    if not isinstance(min_f1, int | float) or not 0 < min_f1 <= 1:
        raise StudyError(f"{where}: facts.known.min_f1: expected a number in (0, 1]")
    return KnownSpec(str(table["task"]), str(table["source"]),
                     positive(where, "facts.known.candidates", table.get("candidates", 1000)),
                     positive(where, "facts.known.count", table.get("count", 50)), float(min_f1))  # fmt: skip
