"""New facts for a real model (titan_mem/eval/unknown_facts.py, tools/select_facts.py): the items a base gets
wrong with answer NLL above the median, split disjointly under a seed, written in the source's format with
the source ids; bad inputs one line."""

from __future__ import annotations

import json

import pytest
from conftest import run_tool

from titan_mem.data.qa import load_qa
from titan_mem.errors import ConfigError
from titan_mem.eval.tasks import TaskContext, TaskError, build_tasks, parse_task_list
from titan_mem.eval.unknown_facts import FactSelectionError, split_facts, unknown_ids, write_splits
from titan_mem.study.choose_facts import _known
from titan_mem.study.facts import KnownSpec

ITEMS = {
    "id": ["0", "1", "2", "3", "4", "5", "6", "7"],
    "em": [0, 0, 1, 0, 0, 1, 0, 0],
    "answer_nll": [5.0, 1.0, 6.0, 4.5, 0.5, 0.2, 3.9, 7.0],
}


def test_unknown_means_wrong_and_above_the_median_nll():
    # median of the 8 NLLs is 4.2: items 0, 3, 7 are wrong and above it; 2 is above but answered right
    assert unknown_ids(ITEMS) == ["0", "3", "7"]


def test_splits_are_disjoint_seeded_and_sized():
    ids = [str(i) for i in range(50)]
    a = split_facts(ids, {"train": 20, "val": 10, "test": 10}, seed=3)
    assert a == split_facts(ids, {"train": 20, "val": 10, "test": 10}, seed=3)
    assert a != split_facts(ids, {"train": 20, "val": 10, "test": 10}, seed=4)
    assert [len(v) for v in a.values()] == [20, 10, 10]
    assert len(set(a["train"]) | set(a["val"]) | set(a["test"])) == 40


def test_the_tool_writes_the_source_rows_with_their_ids(tmp_path):
    source = tmp_path / "qa.jsonl"
    rows = [
        {"context": f"Question: q{i}?\nAnswer:", "answer": f"a{i}", "aliases": [f"a{i}"]} for i in range(8)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"step": 0, "tasks": {"triviaqa": ITEMS}}) + "\n")
    args = [
        "--items",
        str(items),
        "--task",
        "triviaqa",
        "--source",
        str(source),
        "--out",
        str(tmp_path / "f"),
    ]
    r = run_tool("select_facts.py", [*args, "--splits", "train=2,test=1"])
    assert r.returncode == 0, r.stderr
    train, test = load_qa(str(tmp_path / "f" / "train.jsonl")), load_qa(str(tmp_path / "f" / "test.jsonl"))
    assert len(train) == 2 and len(test) == 1
    for ex in (*train, *test):
        assert ex.id in {"0", "3", "7"} and ex.question == f"q{ex.id}?" and ex.answers == [f"a{ex.id}"]
    for bad, needle in (
        (["--splits", "train=5"], "only 3 items qualify"),
        (["--splits", "train"], "--splits: 'train' is not NAME=COUNT"),
        (["--task", "nq_open"], "no task 'nq_open'"),
    ):
        r = run_tool("select_facts.py", [*args, *bad])
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_split_and_its_exemplar_pool_evaluate_exactly_the_split_few_shot(tmp_path):
    """`<split>_eval.jsonl` is the split, then exemplars in no split: a few-shot task limited to the split's
    size evaluates exactly its facts and draws every exemplar from the pool (the study's taught facts)."""
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}", "id": str(i)}) + "\n"
                              for i in range(12)))  # fmt: skip
    splits = {"train": ["3", "5", "7"], "control": ["1"]}
    write_splits(str(source), splits, tmp_path / "f", exemplars=["0", "2", "4", "6"])
    assert [e.id for e in load_qa(str(tmp_path / "f" / "train.jsonl"))] == ["3", "5", "7"]  # what trains
    spec = f"triviaqa:{tmp_path / 'f' / 'train_eval.jsonl'}@limit=3@shots=2@label=taught"
    (task,) = build_tasks([spec], TaskContext(limit=50, shots=0))
    assert task.name == "triviaqa/taught" and [e.id for e in task.examples] == ["3", "5", "7"]
    assert len(task.shots) == 2 and {e.id for e in task.shots} <= {"0", "2", "4", "6"}
    assert parse_task_list(f"{spec},nq_open") == [spec, "nq_open"]  # options survive a comma-joined list
    with pytest.raises(TaskError, match="@shots=x is not one of @shots, @limit, @label, @generate=VALUE"):
        build_tasks([spec.replace("shots=2", "shots=x")], TaskContext())
    with pytest.raises(FactSelectionError, match="exemplar ids are facts of the split"):
        write_splits(str(source), splits, tmp_path / "g", exemplars=["3"])


def test_known_items_are_the_ones_the_base_answers_and_too_few_is_one_line():
    """[facts.known]: held-out questions the base answers (F1 >= min_f1), in evaluation order, with an
    exemplar pool of the others; asking for more than qualify names the count and the fix."""
    scored = {"id": ["a", "b", "c", "d", "e"], "f1": [1.0, 0.2, 0.5, 0.0, 0.9]}
    doc = _known(KnownSpec("nq_open", "x", 5, 2, 0.5), scored)
    assert doc["ids"] == ["a", "c"] and doc["right"] == 3
    with pytest.raises(ConfigError, match="gets 3 of 5 nq_open items right .F1 >= 0.5.; 4 wanted"):
        _known(KnownSpec("nq_open", "x", 5, 4, 0.5), scored)
