"""The study's table of what each evaluation task makes (study/task_metrics.py, what `load_study` checks
metric templates against) agrees with the tasks themselves: every task of the registry, run on a stub model,
logs exactly the task names and metrics the table says, and its items carry exactly the per-item metrics."""

from __future__ import annotations

import json
from pathlib import Path

from titan_mem.data.config import DataConfig
from titan_mem.eval.items import items_of
from titan_mem.eval.lm import Score
from titan_mem.eval.tasks import BUILDERS, TaskContext, build_tasks
from titan_mem.study.task_metrics import METRICS, parse_task

WEIGHTS = {"id", "group", "tokens", "bytes"}  # item columns that are not metrics


class StubModel:
    """Every continuation scores -2 nats over 2 tokens and is greedy; every answer is "x"."""

    def loglikelihood(self, requests, desc=""):
        return [Score(-2.0, 2, True) for _ in requests]

    def loglikelihood_rolling(self, texts, desc=""):
        return [Score(-2.0, 2, True) for _ in texts]

    def generate_until(self, prompts, until=(), max_new_tokens=0, desc=""):
        return ["x" for _ in prompts]


def _files(tmp: Path) -> dict[str, Path]:
    rows = {
        "qa": [{"question": f"q{i}?", "answer": f"a{i}", "id": f"t{i}"} for i in range(6)],
        "gsm": [{"question": f"q{i}?", "answer": f"step\n#### {i}"} for i in range(6)],
        "hs": [{"query": f"c{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(6)],
        "lam": [{"context": f"a passage {i}", "continuation": "word"} for i in range(6)],
        "docs": [{"text": f"A document number {i}."} for i in range(6)],
    }
    out = {}
    for name, records in rows.items():
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_the_table_is_what_every_task_makes(tmp_path):
    f = _files(tmp_path)
    specs = [
        f"triviaqa:{f['qa']}", f"nq_open:{f['qa']}@label=known", f"simpleqa:{f['qa']}@generate=0",
        f"gsm8k:{f['gsm']}", f"hellaswag:{f['hs']}", f"lambada_openai:{f['lam']}", f"perplexity:{f['docs']}",
        "synthetic_qa", "synthetic_completion@label=c", "synthetic_prose", "synthetic_copy",
    ]  # fmt: skip
    assert {parse_task(s).name for s in specs} == set(BUILDERS) == set(METRICS)
    ctx = TaskContext(data=DataConfig(synthetic_taught_people=2), limit=4)
    for spec in specs:
        made: dict[str, tuple[set, set]] = {}
        for task in build_tasks([spec], ctx):
            out = task.evaluate(StubModel())
            for m in out.metrics:
                made.setdefault(m["task"], (set(), set()))[0].add(m["metric"])
            for name, columns in items_of(out.predictions).items():
                made.setdefault(name, (set(), set()))[1].update(set(columns) - WEIGHTS)
        expected = {name: (set(agg), set(items)) for name, (agg, items) in parse_task(spec).outputs().items()}
        assert made == expected, spec
