"""Answer normalization and the QA scores: exact match and token F1, each the maximum over gold aliases.

SQuAD v1.1's official rules are the default (Rajpurkar et al. 2016, evaluate-v1.1.py: lowercase, drop
punctuation, drop the articles a/an/the, collapse whitespace); TriviaQA's official variant (Joshi et al.
2017, triviaqa_evaluation.py) also drops underscores and folds unicode punctuation the same way, which
matters for aliases such as "Rock_n_Roll". lm-eval reports NQ-open EM only; the SMF paper reports NQ F1,
so both come from here.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

from titan_mem.errors import ConfigError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_squad(text: str) -> str:
    """SQuAD v1.1: lowercase, remove ASCII punctuation, remove articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _is_punct(ch: str) -> bool:
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def normalize_triviaqa(text: str) -> str:
    """TriviaQA's variant: underscores become spaces, all unicode punctuation (P* categories) is removed,
    then lowercase, articles and whitespace as in SQuAD."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if _is_punct(ch) else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


NORMALIZERS: dict[str, Callable[[str], str]] = {"squad": normalize_squad, "triviaqa": normalize_triviaqa}


def normalizer(name: str) -> Callable[[str], str]:
    if name not in NORMALIZERS:
        raise ConfigError(f"normalization: expected one of {', '.join(NORMALIZERS)}; got {name!r}")
    return NORMALIZERS[name]


def exact_match(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    """SQuAD's F1 over normalized whitespace tokens (bag of tokens, so repeats count as often as shared).
    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(
    prediction: str, references: Sequence[str], normalize: Callable[[str], str] = normalize_squad
) -> dict[str, float]:
    """EM and F1 of one prediction: the best over the gold aliases (the official scripts' max)."""
    if not references:
        raise ValueError("qa_scores: no reference answers")
    return {
        "em": max(exact_match(prediction, r, normalize) for r in references),
        "f1": max(token_f1(prediction, r, normalize) for r in references),
    }
