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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_mem.study.checks import positive
from titan_mem.study.keys import StudyError

IDS_FILE = "facts.json"


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
    )
