"""Token-weighted NLL for lm-eval tasks: per-document (logprob, tokens) pairs, summed before dividing, so
long solutions weigh by their length (a per-document mean of per-token NLL would not)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def process_nll(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, tuple[float, int]]:
    """(logprob, n_tokens) of the document's one continuation, for both metrics."""
    result = results[0]
    n_tokens = getattr(result, "n_tokens", None)
    if n_tokens is None:
        raise ValueError(
            "token-weighted NLL needs each continuation's token count, which only the titan_mem model "
            "(titan_mem.eval.lm_eval_adapter) returns; lm-eval's interface carries (logprob, is_greedy) only"
        )
    pair = (float(result[0]), int(n_tokens))
    return {"nll": pair, "ppl": pair}


def token_weighted_nll(items: Sequence[tuple[float, int]]) -> float:
    """-sum(logprob) / sum(tokens), nats per token."""
    tokens = sum(n for _, n in items)
    return -sum(lp for lp, _ in items) / max(tokens, 1)


def token_weighted_ppl(items: Sequence[tuple[float, int]]) -> float:
    """exp of the token-weighted NLL (capped at exp(50), as titan_mem.eval.lm.nll_summary)."""
    return math.exp(min(token_weighted_nll(items), 50.0))
