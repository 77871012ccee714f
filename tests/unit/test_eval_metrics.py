"""QA metrics on hand-checked cases: SQuAD v1.1 and TriviaQA normalization, EM and token F1 over aliases."""

from __future__ import annotations

import pytest

from titan_mem.eval.metrics import normalize_squad, normalize_triviaqa, qa_scores, token_f1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear;  the end. ", "apple pear end"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("Rock_n_Roll", "rocknroll"),  # '_' is ASCII punctuation: SQuAD drops it, joining the words
        ("Café  Müller", "café müller"),  # unicode letters kept, lowercased
        ("“Quoted”", "“quoted”"),  # SQuAD removes ASCII punctuation only
    ],
)
def test_squad_normalization(text, expected):
    assert normalize_squad(text) == expected


def test_triviaqa_normalization_differs_where_documented():
    assert normalize_triviaqa("Rock_n_Roll") == "rock n roll"
    assert normalize_triviaqa("“Quoted”") == "quoted"  # unicode punctuation removed too
    assert normalize_triviaqa("The  Beatles") == "beatles"


def test_exact_match_and_f1_hand_checked():
    # prediction tokens [eiffel, tower, paris], gold [eiffel, tower]: P = 2/3, R = 1, F1 = 0.8
    s = qa_scores("The Eiffel Tower, Paris", ["Eiffel Tower"])
    assert s["em"] == 0.0
    assert s["f1"] == pytest.approx(0.8)
    assert qa_scores("the eiffel tower.", ["Eiffel Tower"]) == {"em": 1.0, "f1": 1.0}


def test_maximum_over_aliases():
    # EM from one alias, F1 from another: each metric takes its own maximum
    s = qa_scores("New York", ["New York City", "NYC", "new york"])
    assert s == {"em": 1.0, "f1": 1.0}
    s = qa_scores("York City", ["New York City", "NYC"])
    assert s["em"] == 0.0
    assert s["f1"] == pytest.approx(0.8)  # P = 1, R = 2/3


def test_empty_prediction_and_repeated_tokens():
    assert qa_scores("", ["Paris"]) == {"em": 0.0, "f1": 0.0}
    assert token_f1("", "") == 1.0  # two empty answers agree
    assert token_f1("the", "an") == 1.0  # both normalize to empty
    # bag of tokens: "a a b" vs "a b": common = 2 (a once, b once), P = 2/3, R = 1
    assert token_f1("x x y", "x y") == pytest.approx(0.8)


def test_no_references_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        qa_scores("x", [])
