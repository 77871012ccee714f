"""Few-shot evaluation (issue 30): exemplars come from outside the evaluated items, are the same under a
seed for every item, read as lm-eval's "Question: ..\\nAnswer: .." blocks; a prefix every request shares is
computed once (KV cache) and gives the numbers of recomputing it; the trainer, tools/evaluate.py and study
files take `shots` and refuse bad values in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, tiny_transformer
from test_eval_scoring import TOK, V
from test_study_spec import GOOD, _write

from titan_mem import config as config_mod
from titan_mem.data.config import DataConfig
from titan_mem.data.records import QAExample
from titan_mem.errors import ConfigError
from titan_mem.eval.fewshot import SHOT_POOL, ShotsError, fewshot_prefix, split_shots
from titan_mem.eval.greedy import greedy_generate
from titan_mem.eval.lm import EvalModel
from titan_mem.eval.tasks import QATask, TaskContext, TaskError, build_tasks
from titan_mem.models.transformer import Transformer
from titan_mem.study.runner import plan
from titan_mem.study.spec import StudyError, load_study

ITEMS = [QAExample(f"q{i}?", [f"a{i}"], f"id{i}") for i in range(40)]


def test_exemplars_lie_outside_the_evaluated_items_and_follow_the_seed():
    evaluated, shots = split_shots(ITEMS, 10, 5, seed=0, name="t")
    assert [e.id for e in evaluated] == [f"id{i}" for i in range(10)]  # as zero-shot: the first `limit`
    assert len(shots) == 5 and not {e.id for e in shots} & {e.id for e in evaluated}
    assert split_shots(ITEMS, 10, 5, seed=0, name="t") == (evaluated, shots)  # deterministic
    assert split_shots(ITEMS, 10, 5, seed=1, name="t")[1] != shots  # the seed picks them
    assert split_shots(ITEMS, 10, 0, seed=0, name="t") == (evaluated, [])
    # no limit: the last half (at most SHOT_POOL items) is the pool and is not evaluated
    rest, shots = split_shots(ITEMS, None, 3, seed=0, name="t")
    assert len(rest) == 20 and {e.id for e in shots} <= {e.id for e in ITEMS[20:]}
    with pytest.raises(
        ShotsError, match=r"^nq: 40 items leave 2 after the 38 evaluated, fewer than shots = 5"
    ):
        split_shots(ITEMS, 38, 5, seed=0, name="nq")


def test_fewshot_prompt_text_is_exact():
    assert fewshot_prefix([("Who wrote Emma?", "Jane Austen"), (" Where is Lima ", " Peru\n")]) == (
        "Question: Who wrote Emma?\nAnswer: Jane Austen\n\nQuestion: Where is Lima\nAnswer: Peru\n\n"
    )
    task = QATask("t", ITEMS[:1], ITEMS[5:7])
    lm = EvalModel(_model(), TOK, max_seq_len=128)
    out = task.evaluate(lm)
    assert (
        out.predictions[0]["prompt"]
        == "Question: q5?\nAnswer: a5\n\nQuestion: q6?\nAnswer: a6\n\nQuestion: q0?\nAnswer:"
    )


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_tasks_keep_the_zero_shot_items_and_prefix_every_one():
    ctx = TaskContext(data_dir=SHARED_DATA, limit=30, shots=5, shots_seed=3)
    (nq, gsm) = build_tasks(["nq_open", "gsm8k"], ctx)
    (nq0, gsm0) = build_tasks(["nq_open", "gsm8k"], TaskContext(data_dir=SHARED_DATA, limit=30))
    assert [e.id for e in nq.examples] == [e.id for e in nq0.examples]
    assert len(nq.shots) == 5 and not {e.id for e in nq.shots} & {e.id for e in nq0.examples}
    pool = {
        e.id
        for e in build_tasks(["nq_open"], TaskContext(data_dir=SHARED_DATA, limit=30 + SHOT_POOL))[
            0
        ].examples[30:]
    }
    assert {e.id for e in nq.shots} <= pool
    assert nq.prefix == "".join(f"Question: {e.question}\nAnswer: {e.answers[0]}\n\n" for e in nq.shots)
    assert gsm.pairs == gsm0.pairs and gsm.prefix.count("\nAnswer: ") == 5 and gsm.prefix.endswith("\n\n")
    assert "#### " in gsm.prefix  # worked solutions as exemplars
    with pytest.raises(TaskError, match="^nq_open: 3610 items leave 0"):
        build_tasks(["nq_open"], TaskContext(data_dir=SHARED_DATA, limit=4000, shots=1))


def test_synthetic_qa_shots_are_known_facts_no_population_evaluates():
    data = DataConfig(source="synthetic", regime="qa", synthetic_taught_people=5)
    tasks = build_tasks(["synthetic_qa"], TaskContext(data=data, limit=12, shots=4, shots_seed=1))
    zero = build_tasks(["synthetic_qa"], TaskContext(data=data, limit=12))
    evaluated = {e.id for t in tasks for e in t.examples}
    shots = tasks[0].shots
    assert len(shots) == 4 and all(s.id.startswith("known-") for s in shots)
    assert not {s.id for s in shots} & evaluated
    assert all(t.shots == shots for t in tasks)  # one prefix for every population
    assert [[e.id for e in t.examples] for t in tasks] == [[e.id for e in t.examples] for t in zero]


def _model() -> Transformer:
    """A tiny model whose answers depend on the context (weights scaled up from the default init)."""
    model = tiny_transformer(V, n_heads=4, max_seq_len=128)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def test_prefix_reuse_equals_recomputing_it_for_nll_and_greedy_answers():
    model = _model()
    widths: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    prefix = fewshot_prefix([(f"Who founded city {c}?", f"Founder {c}") for c in "ABCD"])
    questions = ["Where was Ada born?", "Who?", "What is the capital of the far northern country?", "Why?"]
    prompts = [prefix + f"Question: {q}\nAnswer:" for q in questions]
    pairs = [(p, f" answer {i}") for i, p in enumerate(prompts)]
    results = {}
    for reuse in (False, True):
        widths.clear()
        lm = EvalModel(model, TOK, max_seq_len=128, batch_size=3, reuse_prefix=reuse)
        scores = lm.loglikelihood(pairs)
        answers = lm.generate_until(prompts, until=["\n"], max_new_tokens=8)
        results[reuse] = scores, answers, sorted(widths)
    (s0, a0, w0), (s1, a1, w1) = results[False], results[True]
    shared = len(TOK.encode(prefix)) - 1  # "\n\n" tokenizes differently before a word: a token less at most
    # reuse: one forward of the shared prefix per call (2), every other one runs the rows' own tokens only
    assert len([w for w in w1 if w >= shared]) == 2 and w1[-3] <= w0[-1] - shared + 1 < w0[-1]
    assert [s.logprob for s in s1] == pytest.approx([s.logprob for s in s0], abs=1e-4)
    assert [s.greedy for s in s1] == [s.greedy for s in s0] and [s.n_tokens for s in s1] == [
        s.n_tokens for s in s0
    ]
    assert a1 == a0 and len(set(a0)) > 1  # the answers differ per item, so the comparison means something


def test_trainer_and_study_take_shots_and_refuse_bad_values(tmp_path):
    cfg = config_mod.parse_args(["--eval.shots=5", "--eval.shots_seed=2"])
    assert (cfg.eval.shots, cfg.eval.shots_seed) == (5, 2)
    with pytest.raises(ConfigError, match="^eval.shots: must be >= 0; got -1$"):
        config_mod.parse_args(["--eval.shots=-1"])
    spec = load_study(_write(tmp_path, GOOD.replace("limit = 6", "limit = 6\nshots = 3\nshots_seed = 7")))
    assert (spec.eval_shots, spec.eval_shots_seed) == (3, 7)
    argvs = [j.cmd.argv for j in plan(spec)]
    assert all("--eval.shots=3" in a and "--eval.shots_seed=7" in a for a in argvs if "titan_mem.train" in a)
    base_eval = next(a for a in argvs if "eval" in a and "titan_mem.study.worker" in a)
    assert base_eval[base_eval.index("--shots") + 1] == "3" and "--shots-seed" in base_eval
    for bad in ("-1", '"five"', "true"):
        path = _write(tmp_path, GOOD.replace("limit = 6", f"limit = 6\nshots = {bad}"))
        with pytest.raises(StudyError, match=r"study.toml: eval.shots: expected a non-negative integer$"):
            load_study(path)
    with pytest.raises(StudyError, match=r"unknown key eval.shot$"):
        load_study(_write(tmp_path, GOOD.replace("limit = 6", "limit = 6\nshot = 3")))


def test_finished_rows_leave_the_batch_and_change_no_answer():
    model = _model()
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    prompts = [TOK.encode(q) for q in ("Where was Ada born?", "Who?", "What is the capital of Peru?", "Why?")]
    kw = {"max_new_tokens": 6, "pad_id": TOK.pad_id, "eos_id": None}
    kw["should_stop"] = lambda i, new: len(new) > i
    cached = greedy_generate(model, prompts, **kw)
    assert [len(c) for c in cached] == [1, 2, 3, 4]  # row i stops after i + 1 tokens
    assert rows == [4, 3, 2, 1]  # each forward runs only the rows still decoding
    assert cached == greedy_generate(model, prompts, use_cache=False, **kw)


def test_answer_nll_only_skips_generation_and_scores_the_same():
    """`generate=0` (an NLL-first evaluation): no greedy answers, the same answer NLL per item."""
    lm = EvalModel(_model(), TOK, max_seq_len=128, batch_size=3)
    full, nll_only = QATask("qa", ITEMS[:4]), QATask("qa", ITEMS[:4], generate=False)
    calls: list[int] = []
    generate = lm.generate_until
    lm.generate_until = lambda prompts, **kw: calls.append(len(prompts)) or generate(prompts, **kw)
    a, b = full.evaluate(lm), nll_only.evaluate(lm)
    assert calls == [4]  # only the full task generated
    assert [m["metric"] for m in b.metrics] == ["answer_nll"] and "f1" not in b.predictions[0]
    assert [p["answer_nll"] for p in b.predictions] == [p["answer_nll"] for p in a.predictions]
