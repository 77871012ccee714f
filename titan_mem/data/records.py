"""Plain records shared by the synthetic generator, the finetuning regimes and the evaluation loaders.

Kept apart from the loaders so evaluation code can import them without pulling in torch data machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QAExample:
    """A question with its accepted answers (first = canonical, used as the training target)."""

    question: str
    answers: list[str]
    id: str = ""


@dataclass(frozen=True)
class MultipleChoiceExample:
    """Context and candidate continuations; `gold` indexes the right one (HellaSwag)."""

    context: str
    choices: list[str]
    gold: int
    id: str = ""


@dataclass(frozen=True)
class GSM8KExample:
    """A math word problem; `answer` is the full worked solution ending in '#### N'."""

    question: str
    answer: str
    id: str = ""

    @property
    def final_answer(self) -> str:
        return self.answer.rsplit("####", 1)[-1].strip()


@dataclass(frozen=True)
class FactExample:
    """One fact and its paraphrases: the unit of the SMF fact regime (one fact per batch)."""

    fact_id: str
    paraphrases: list[str]
    question: str = ""
    answer: str = ""
    meta: dict = field(default_factory=dict)
