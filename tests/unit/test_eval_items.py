"""The study's measurement: synthetic populations (random, split known halves), the copying probe, and the
per-item records every evaluation point keeps (in-loop eval_items.jsonl), whose means are the logged
metrics."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_scoring import TOK, Rigged, _lm, _tiny_transformer

from titan_mem.config import Config
from titan_mem.data.config import DataConfig
from titan_mem.data.synthetic import ATTRIBUTES, QUESTIONS, world_of
from titan_mem.eval import tasks as tasks_mod
from titan_mem.eval.in_loop import InLoopEvaluator
from titan_mem.eval.items import ITEMS_FILE, items_of, read_items
from titan_mem.eval.tasks import COPY_CUE, POPULATIONS, QATask, TaskContext, build_tasks, copy_items

WORLD = dict(synthetic_known_people=30, synthetic_qa_people=12, synthetic_new_people=10)
DATA = DataConfig(**WORLD, synthetic_taught_people=4)


def _pid(fact_id: str) -> int:
    return int(fact_id.split("-")[1])


def _tasks(names, limit, data=DATA):
    return {t.name: t for t in build_tasks(names, TaskContext(data=data, limit=limit))}


def test_populations_are_random_people_with_all_six_facts_and_random_templates():
    tasks = _tasks(["synthetic_qa", "synthetic_completion"], 12)
    world = world_of(DATA)
    assert list(tasks) == [
        f"{kind}/{p}" for kind in ("synthetic_qa", "synthetic_completion") for p in POPULATIONS
    ]
    picked = {}
    for population in POPULATIONS:
        qa, completion = tasks[f"synthetic_qa/{population}"], tasks[f"synthetic_completion/{population}"]
        ids = [e.id for e in qa.examples]
        assert ids == [e.id for e in completion.examples]  # the same facts asked two ways
        pids = list(dict.fromkeys(_pid(i) for i in ids))
        assert len(ids) == 12 and len(pids) == 2  # limit 12 = two people, all six attributes each
        assert ids == [f"{world.people('all')[p].population}-{p}-{a}" for p in pids for a in ATTRIBUTES]
        members = [p.pid for p in world.people(population, DATA.synthetic_taught_people)]
        assert set(pids) <= set(members)
        picked[population] = pids
    # people drawn at random, not the population's first ones (the old head-of-list sample)
    heads = {p: [x.pid for x in world.people(p, 4)][:2] for p in POPULATIONS}
    assert picked != heads
    # the templates vary per item (both question variants occur), and the same sample every build
    examples = [e for t in tasks.values() if t.name.startswith("synthetic_qa/") for e in t.examples]
    questions = [e.question for e in examples]
    assert {QUESTIONS[e.id.split("-", 2)[2]].index(_template(e)) for e in examples} == {0, 1}
    again = _tasks(["synthetic_qa"], 12)
    assert [e.question for t in again.values() for e in t.examples] == questions
    # a larger limit asks the same questions and more
    more = _tasks(["synthetic_qa"], 18)["synthetic_qa/known_val"].examples
    assert [(e.id, e.question) for e in more[:12]] == [
        (e.id, e.question) for e in tasks["synthetic_qa/known_val"].examples
    ]
    # items carry their person: QATask records group = pid
    out = tasks["synthetic_qa/known_val"]
    assert out.group_of(out.examples[0]) == _pid(out.examples[0].id)


def _template(example) -> str:
    """The QUESTIONS template a synthetic question was rendered from."""
    attr = example.id.split("-", 2)[2]
    for tpl in QUESTIONS[attr]:
        head, _, tail = tpl.partition("{name}")
        if example.question.startswith(head) and example.question.endswith(tail):
            return tpl
    raise AssertionError(f"{example.question!r} matches no template of {attr}")


def test_known_halves_cover_all_known_people_and_untaught_is_the_rest_of_the_new():
    tasks = _tasks(["synthetic_qa"], None)
    world = world_of(DATA)
    people = {p: {_pid(e.id) for e in tasks[f"synthetic_qa/{p}"].examples} for p in POPULATIONS}
    assert people["known_val"] | people["known_test"] == set(range(30))
    assert not people["known_val"] & people["known_test"]
    for half in ("known_val", "known_test"):  # 12 QA-trained, 18 biography-only: half of each
        kinds = [world.person_kind(pid) for pid in people[half]]
        assert kinds.count("known_qa") == 6 and kinds.count("known_bio") == 9
    assert people["new_taught"] == set(range(30, 34)) and people["new_untaught"] == set(range(34, 40))


def test_copy_items_repeat_a_name_from_the_prompt_and_the_scorer_reads_the_model():
    world = world_of(DATA)
    items = copy_items(world, 40)
    days = world.heldout_days(40)
    for (_, prompt, target), day in zip(items, days):
        assert prompt.endswith(COPY_CUE) and day.startswith(prompt + target + " ")
        assert prompt.split(" ", 1)[0] == target.strip()  # the name only the context tells
    assert len({t for _, _, t in items}) > 3  # many names: no constant answer
    (task,) = _tasks(["synthetic_copy"], 40).values()
    assert task.items == items
    ben = TOK.encode(" Ben")
    assert len(ben) == 1  # a rigged model preferring this token copies exactly the Ben items
    out = task.evaluate(_lm(Rigged({ben[0]})))
    want = [float(t == " Ben") for _, _, t in items]
    assert 0 < sum(want) < len(want)
    assert [p["em"] for p in out.predictions] == want
    values = {m["metric"]: m["value"] for m in out.metrics}
    assert values["em"] == pytest.approx(sum(want) / len(want))
    nll = [p["answer_nll"] for p in out.predictions]
    assert max(n for n, w in zip(nll, want) if w) < min(n for n, w in zip(nll, want) if not w)


def _check_means(metrics: dict[str, float], columns: dict[str, list], task: str) -> None:
    """The logged aggregates from the item columns: plain means of em/f1, token-weighted NLL means."""
    for key in ("em", "f1"):
        if key in columns:
            assert metrics[key] == sum(columns[key]) / len(columns[key]), task  # the same sum: exact
    for key in ("answer_nll", "nll"):
        if key in columns:
            weighted = sum(v * n for v, n in zip(columns[key], columns["tokens"])) / sum(columns["tokens"])
            assert metrics[key] == pytest.approx(weighted, rel=1e-12), task


def test_item_columns_reproduce_the_logged_means(monkeypatch):
    monkeypatch.setattr(tasks_mod, "QA_MAX_NEW_TOKENS", 4)  # short answers: the test is about the means
    model = _tiny_transformer()
    lm = _lm(model)
    (qa,) = [t for t in _tasks(["synthetic_qa"], 9).values() if t.name.endswith("known_val")]
    first = qa.evaluate(lm).predictions
    assert all(p["prediction"] for p in first)
    # rig the references so em and f1 vary over the items: exact, one shared word, unrelated
    refs = [[p["prediction"]] if i % 3 == 0 else [p["prediction"].split()[0] + " zzz"] if i % 3 == 1 else
            e.answers for i, (p, e) in enumerate(zip(first, qa.examples))]  # fmt: skip
    examples = [type(e)(e.question, r, e.id) for e, r in zip(qa.examples, refs)]
    task = QATask(qa.name, examples, group_of=qa.group_of)
    tasks = [task, *_tasks(["synthetic_copy", "synthetic_prose"], 7).values()]
    outputs = [t.evaluate(lm) for t in tasks]
    items = items_of([p for o in outputs for p in o.predictions])
    assert list(items) == [t.name for t in tasks]
    cols = items[task.name]
    assert set(cols) == {"id", "group", "em", "f1", "answer_nll", "tokens"}
    assert cols["id"] == [e.id for e in examples] and cols["group"] == [_pid(e.id) for e in examples]
    assert 0 < sum(cols["em"]) < len(examples) and any(0 < f < 1 for f in cols["f1"])
    assert set(items["synthetic_copy"]) == {"id", "em", "answer_nll", "tokens"}
    assert set(items["synthetic_prose"]) == {"id", "nll", "tokens", "bytes"}
    for t, out in zip(tasks, outputs):
        metrics = {m["metric"]: m["value"] for m in out.metrics}
        _check_means(metrics, items[t.name], t.name)
    # the case separates a token-weighted mean from a plain one
    nll, tokens = cols["answer_nll"], cols["tokens"]
    assert len(set(tokens)) > 1
    assert sum(nll) / len(nll) != pytest.approx(sum(a * n for a, n in zip(nll, tokens)) / sum(tokens))


def test_in_loop_evaluator_appends_one_items_line_per_point(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks_mod, "QA_MAX_NEW_TOKENS", 4)  # short answers: the test is about the file
    cfg = Config()
    cfg.job.dump_folder = str(tmp_path / "run")
    cfg.data = DataConfig(**WORLD, synthetic_taught_people=4)
    cfg.eval.tasks, cfg.eval.limit, cfg.eval.batch_size = ["synthetic_qa", "synthetic_prose"], 6, 4
    model = _tiny_transformer()
    evaluator = InLoopEvaluator(cfg, model, TOK, max_seq_len=64)
    logged = {step: evaluator.run(step) for step in (0, 5)}
    with torch.no_grad():  # the model moves between points: the file follows it
        model.output.weight.add_(0.5)
    logged[5] = evaluator.run(5)  # a resumed run evaluating step 5 again: the reader keeps the last
    path = tmp_path / "run" / ITEMS_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 5, 5] and set(lines[0]) == {"step", "tasks"}
    items = read_items(path)
    assert items[5] == lines[2]["tasks"] != lines[1]["tasks"]
    names = [*(f"synthetic_qa/{p}" for p in POPULATIONS), "synthetic_prose"]
    for step in (0, 5):
        assert list(items[step]) == names
        for name in names:
            columns = items[step][name]
            assert all(len(v) == 6 for v in columns.values())
            prefix = f"eval/{name}/"
            metrics = {k[len(prefix) :]: v for k, v in logged[step].items() if k.startswith(prefix)}
            assert set(metrics) >= set(columns) - {"id", "group", "tokens", "bytes"}
            _check_means(metrics, columns, name)
