import json
from pathlib import Path

import pytest

from titan_mem.data.qa import (
    load_gsm8k,
    load_hellaswag,
    load_nq_open,
    load_qa,
    load_simpleqa,
    load_triviaqa,
    qa_from_record,
)
from titan_mem.data.records import GSM8KExample, MultipleChoiceExample, QAExample

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").is_file(), reason="../shared/data not present")


@needs_data
def test_triviaqa_local():
    qa = load_triviaqa(str(DATA / "triviaqa_3k.jsonl"))
    assert len(qa) == 3000 and all(isinstance(q, QAExample) for q in qa)
    first = qa[0]
    assert first.question == "Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?"
    assert first.answers[0] == "Onion" and "Allium cepa" in first.answers
    assert not any(q.question.startswith("Question:") or q.question.endswith("Answer:") for q in qa)


@needs_data
def test_nq_open_local():
    qa = load_nq_open(str(DATA / "nq_open_dev.jsonl"))
    assert len(qa) == 3610
    assert qa[0].question == "when was the last time anyone was on the moon"
    assert qa[0].answers == ["14 December 1972 UTC", "December 1972"]


@needs_data
def test_simpleqa_local_csv():
    qa = load_simpleqa(str(DATA / "simpleqa_test.csv"))
    assert len(qa) == 4326
    assert qa[0].question == "Who received the IEEE Frank Rosenblatt Award in 2010?"
    assert qa[0].answers == ["Michio Sugeno"]


@needs_data
def test_gsm8k_local():
    ex = load_gsm8k(str(DATA / "gsm8k_test.jsonl"))
    assert len(ex) == 1319 and isinstance(ex[0], GSM8KExample)
    assert ex[0].question.startswith("Janet") and ex[0].final_answer == "18"
    assert all(e.final_answer.replace(",", "").lstrip("-").replace(".", "").isdigit() for e in ex)


@needs_data
def test_hellaswag_local():
    ex = load_hellaswag(str(DATA / "hellaswag_4.jsonl"))
    assert len(ex) == 4 and isinstance(ex[0], MultipleChoiceExample)
    assert ex[0].context.startswith("Removing ice from car") and len(ex[0].choices) == 4 and ex[0].gold == 3
    assert all(0 <= e.gold < len(e.choices) for e in ex)


def test_hf_shapes(tmp_path):
    # TriviaQA rc.nocontext on the hub: answer is a dict of value + aliases
    answer = {"value": "Paris", "aliases": ["Paris", "City of Light"], "normalized_value": "paris"}
    hf_trivia = {"question": "Capital of France?", "question_id": "tq1", "answer": answer}
    assert qa_from_record(hf_trivia) == QAExample("Capital of France?", ["Paris", "City of Light"], id="tq1")
    # SimpleQA upstream column names
    assert qa_from_record({"problem": "Who?", "answer": "Me"}).answers == ["Me"]
    # HellaSwag on the hub: ctx / endings / label (a string)
    path = tmp_path / "hs.jsonl"
    path.write_text(
        json.dumps({"ind": 7, "ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"}) + "\n"
    )
    assert load_hellaswag(str(path)) == [MultipleChoiceExample("A man", ["a", "b", "c", "d"], 2, id="7")]
    with pytest.raises(ValueError, match="no question field"):
        qa_from_record({"text": "nothing"})


def test_limit_and_missing_local_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answers": [f"a{i}"]}) + "\n" for i in range(5)))
    assert [q.question for q in load_qa(str(path), limit=2)] == ["q0", "q1"]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_qa(str(tmp_path / "nope.jsonl"))
