"""Facts for the SMF fact regime from a QA set (TriviaQA, SimpleQA, ...): each pair rendered through statement
templates (`data.fact_paraphrases=templates`; a {fact_id, paraphrases} JSONL is `qa.load_facts`)."""

from __future__ import annotations

from collections.abc import Sequence

from titan_mem.data.records import FactExample, QAExample

# Statements that hold a QA pair's answer, for teaching a QA set as facts (Lin et al. 2025 had a model write
# paraphrases of each TriviaQA fact; templates are the offline stand-in, or give {fact_id, paraphrases}).
QA_FACT_TEMPLATES = (
    "Question: {q}\nAnswer: {a}",
    "{q} The answer is {a}.",
    'The answer to the question "{q}" is {a}.',
    "{a} is the answer to this question: {q}",
    "Q: {q} A: {a}",
    'Asked "{q}", the right reply is {a}.',
    "Trivia fact: {q} Answer: {a}.",
    'If someone asks "{q}", tell them {a}.',
)


def facts_from_qa(examples: Sequence[QAExample], n_paraphrases: int) -> list[FactExample]:
    """Each QA pair (first answer) as a fact rendered through `n_paraphrases` templates (cycled)."""
    out = []
    for e in examples:
        q, a = e.question.strip(), e.answers[0].strip()
        k = len(QA_FACT_TEMPLATES)
        paraphrases = [QA_FACT_TEMPLATES[i % k].format(q=q, a=a) for i in range(n_paraphrases)]
        out.append(FactExample(fact_id=str(e.id), paraphrases=paraphrases, question=q, answer=a))
    return out
