"""Scoring primitives and task scorers against hand-computed values: a uniform model (every token has
probability 1/V, so every log-likelihood is -n log V), a model rigged to prefer given tokens, and a tiny
real Transformer whose NLL is recomputed here from one full forward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_transformer

from titan_mem.data import build_tokenizer
from titan_mem.data.config import TokenizerConfig
from titan_mem.data.records import MultipleChoiceExample
from titan_mem.eval.lm import EvalModel, cut_at_stop, plan_batches
from titan_mem.eval.tasks import AnswerNLLTask, MultipleChoiceTask
from titan_mem.models.transformer import Transformer

TOK = build_tokenizer(TokenizerConfig(name="debug"))
V = TOK.padded_vocab_size


class Rigged(torch.nn.Module):
    """Logits 0 everywhere except `bonus` on the preferred token ids: with no preference, uniform."""

    def __init__(self, preferred: set[int] = frozenset(), bonus: float = 10.0):
        super().__init__()
        self.register_buffer("bias", torch.zeros(V))
        for t in preferred:
            self.bias[t] = bonus

    def forward(self, tokens: torch.Tensor, **_: object) -> torch.Tensor:
        return self.bias.expand(*tokens.shape, V).clone()


def _lm(model: torch.nn.Module, max_seq_len: int = 64, batch_size: int = 4) -> EvalModel:
    return EvalModel(model, TOK, max_seq_len=max_seq_len, batch_size=batch_size)


def test_uniform_model_loglikelihood_is_minus_n_log_v():
    lm = _lm(Rigged())
    scores = lm.loglikelihood([("Question: who?\nAnswer:", " Ada Lovelace"), ("", "hello world")])
    for (ctx, cont), s in zip([("Question: who?\nAnswer:", " Ada Lovelace"), ("", "hello world")], scores):
        n = len(TOK.encode(ctx + cont)) - len(TOK.encode(ctx))
        assert s.n_tokens == n > 0
        assert s.logprob == pytest.approx(-n * math.log(V), rel=1e-6)
        assert s.nll_per_token == pytest.approx(math.log(V), rel=1e-6)


def test_rolling_windows_score_every_token_once():
    text = "The city of Springfield has a river, three bridges and a market on every Sunday morning. " * 3
    n = len(TOK.encode(text))
    for max_len in (8, 16, 512):  # many windows, a few, one
        (s,) = _lm(Rigged(), max_seq_len=max_len).loglikelihood_rolling([text])
        assert s.n_tokens == n
        assert s.logprob == pytest.approx(-n * math.log(V), rel=1e-6)


def test_hellaswag_scoring_picks_the_ending_a_rigged_model_prefers():
    ex = MultipleChoiceExample(
        "Baking cookies: A chef shows a stack of pans. The pans",
        ["contain egg yolks.", "are filled with pastries and loaded into the oven.", "are blue."],
        gold=1,
    )
    preferred = set(TOK.encode(" " + ex.choices[1])) - set(TOK.encode(" " + ex.choices[0] + ex.choices[2]))
    out = MultipleChoiceTask("hellaswag", [ex]).evaluate(_lm(Rigged(preferred)))
    values = {m["metric"]: m["value"] for m in out.metrics}
    assert values == {"acc": 1.0, "acc_norm": 1.0}
    # against a different gold the same model is wrong: the scorer reads the model, not the label
    wrong = MultipleChoiceExample(ex.context, ex.choices, gold=2)
    out = MultipleChoiceTask("hellaswag", [wrong]).evaluate(_lm(Rigged(preferred)))
    assert {m["metric"]: m["value"] for m in out.metrics} == {"acc": 0.0, "acc_norm": 0.0}


def test_acc_norm_divides_by_characters():
    """Uniform model: ll = -n_tokens log V. acc picks the fewest tokens; acc_norm the most characters per
    token -- computed here by hand from the tokenizer."""
    choices = ["zq", "a reasonably long and ordinary ending"]
    n_tok = [len(TOK.encode(" " + c)) for c in choices]
    ex = MultipleChoiceExample("Context", choices, gold=1)
    out = MultipleChoiceTask("hellaswag", [ex]).evaluate(_lm(Rigged()))
    pred = out.predictions[0]
    want_acc = min(range(2), key=lambda i: n_tok[i])
    want_norm = max(range(2), key=lambda i: -n_tok[i] * math.log(V) / len(choices[i]))
    assert want_acc != want_norm  # the case separates the two metrics
    assert pred["acc"] == float(want_acc == 1) and pred["acc_norm"] == float(want_norm == 1)
    assert pred["loglikelihoods"] == pytest.approx([-n * math.log(V) for n in n_tok], rel=1e-6)


def _tiny_transformer() -> Transformer:
    return tiny_transformer(V).eval()


def test_nll_equals_a_hand_computed_value_and_ignores_batch_neighbours():
    model = _tiny_transformer()
    pairs = [
        ("Question: When was Ada born?\nAnswer:", " December 10, 1815"),
        ("Q", " a much longer continuation that pads the other row of the batch"),
    ]
    task = AnswerNLLTask("gsm8k", [(str(i), p, t) for i, (p, t) in enumerate(pairs)])
    out = task.evaluate(_lm(model))
    total_nll, total_tokens = 0.0, 0
    for (ctx, cont), pred in zip(pairs, out.predictions):
        ids = [TOK.bos_id, *TOK.encode(ctx + cont)]
        n_ctx = 1 + len(TOK.encode(ctx))
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
        nll = -sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
        assert pred["nll"] == pytest.approx(nll / (len(ids) - n_ctx), rel=1e-5)
        total_nll, total_tokens = total_nll + nll, total_tokens + len(ids) - n_ctx
    values = {m["metric"]: m["value"] for m in out.metrics}
    assert values["nll"] == pytest.approx(total_nll / total_tokens, rel=1e-5)  # token-weighted
    # one at a time (no padded neighbour) gives the same numbers
    alone = [AnswerNLLTask("g", [("0", p, t)]).evaluate(_lm(model)).predictions[0]["nll"] for p, t in pairs]
    assert alone == pytest.approx([p["nll"] for p in out.predictions], rel=1e-5)


def test_generate_until_cuts_at_a_stop_string_spanning_tokens():
    lm = _lm(_tiny_transformer())
    (free,) = lm.generate_until(["Question: Where was Ada born?"], until=[], max_new_tokens=6)
    ids = TOK.encode(free)
    first = TOK.decode(ids[:1])
    assert len(ids) >= 3 and first and free.startswith(first)
    stop = free[len(first) - 1 : len(first) + 1]  # last character of token 1 + first of token 2
    (cut,) = lm.generate_until(["Question: Where was Ada born?"], until=[stop], max_new_tokens=6)
    assert cut == free[: free.index(stop)]
    assert len(cut) < len(free)


def test_plan_batches_longest_first_within_budgets():
    batches = plan_batches([3, 9, 1, 9, 4], max_rows=2, max_tokens=20)
    assert batches == [[1, 3], [4, 0], [2]]
    assert plan_batches([30, 2], max_rows=8, max_tokens=20) == [[0], [1]]  # an over-long row alone
    assert cut_at_stop("abc\ndef.", ["\n", "."]) == "abc"
