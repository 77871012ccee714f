"""Every bad study file a user could write fails up front, in `load_study` and so in `--dry-run`, with one
line naming the file, the key and the value (exit 2): wrong types, unknown tasks and task options, metric
templates the tasks do not make, paths that are not there, outputs that cannot be created, and the
structural mistakes (no arms, repeated arms, a method whose config is missing, a base study that loops).
Before, most of these passed the dry run and failed after every arm had trained, or as a TypeError."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_study_spec import GOOD, _write

from titan_mem.study.__main__ import main
from titan_mem.study.spec import StudyError, load_study

LORA_ARM = '[[arm]]\nmethod = "lora"\nlr = [1e-3, 1e-2]\nlora_rank = [2, 4]\n'

# (name, [(old, new) edits of GOOD], the key the one error line names, more words it must hold)
CASES = [
    # [eval] tasks: the registry and the @option syntax
    ("unknown task", [('"synthetic_qa", "perplexity', '"synthetic_qaa", "perplexity')],
     "eval.tasks: 'synthetic_qaa': unknown task 'synthetic_qaa'", "known: triviaqa"),
    ("bad task option", [('"synthetic_qa", "perplexity', '"synthetic_qa@shots=x", "perplexity')],
     "eval.tasks: 'synthetic_qa@shots=x'", "@shots=x"),
    ("source for a synthetic task", [('"synthetic_qa", "perplexity', '"synthetic_qa:x.jsonl", "perplexity')],
     "eval.tasks: 'synthetic_qa:x.jsonl'", "not a source"),
    ("perplexity needs a source", [('"perplexity:{doc}"]', '"perplexity:{doc}", "perplexity"]')],
     "eval.tasks: 'perplexity': perplexity needs a source", ""),
    ("one task twice", [('"synthetic_qa", "perplexity', '"synthetic_qa", "synthetic_qa", "perplexity')],
     "eval.tasks: 'synthetic_qa': a second task named 'synthetic_qa/known_val'", "@label"),
    ("tasks not a list", [('tasks = ["synthetic_qa", "perplexity:{doc}"]', 'tasks = "synthetic_qa"')],
     "eval.tasks: expected a list of str; got 'synthetic_qa'", ""),
    # files the tasks read
    ("missing perplexity file", [("perplexity:{doc}", "perplexity:/nonexistent/docs.jsonl")],
     "eval.tasks: 'perplexity:/nonexistent/docs.jsonl': /nonexistent/docs.jsonl not found", ""),
    ("missing QA file", [('"synthetic_qa", "perplexity', '"triviaqa:/nonexistent/qa.jsonl", "synthetic_qa", '
                          '"perplexity')],
     "eval.tasks: 'triviaqa:/nonexistent/qa.jsonl': /nonexistent/qa.jsonl not found", ""),
    ("missing data_dir", [("limit = 6", 'limit = 6\ndata_dir = "/nonexistent/data"')],
     "eval.data_dir: '/nonexistent/data' is not a folder", ""),
    ("data_dir without the task's file",
     [("limit = 6", 'limit = 6\ndata_dir = "{base}"'), ('["synthetic_qa",', '["gsm8k", "synthetic_qa",')],
     "eval.tasks: 'gsm8k':", "gsm8k_test.jsonl not found"),
    ("data_dir of the wrong type", [("limit = 6", "limit = 6\ndata_dir = 5")],
     "eval.data_dir: expected a string; got 5", ""),
    # metric templates against what the tasks make
    ("misspelled learning metric", [(":answer_nll\"\ncontrol", ":answer_nl\"\ncontrol")],
     "eval.learning: 'synthetic_qa/new_taught:answer_nl': synthetic_qa/new_taught has no metric 'answer_nl'",
     "it has: answer_nll, em, f1"),
    ("misspelled control population", [("new_untaught:answer_nll", "new_untaugh:answer_nll")],
     "eval.control: 'synthetic_qa/new_untaugh:answer_nll': eval.tasks make no task "
     "'synthetic_qa/new_untaugh'", "synthetic_qa/new_untaught"),
    ("misspelled forgetting label", [("known_{split}:f1", "knwn_{split}:f1")],
     "eval.forgetting: 'synthetic_qa/knwn_{split}:f1': eval.tasks make no task 'synthetic_qa/knwn_val'", ""),
    ("forgetting metric without items", [("{doc}:nll\"]", "{doc}:ppl\"]")],
     "eval.forgetting: 'perplexity:", "has no per-item metric 'ppl'"),
    ("forgetting task not evaluated", [("known_{split}:f1", "known_{split}:f1\", \"gsm8k:nll")],
     "eval.forgetting: 'gsm8k:nll': eval.tasks make no task 'gsm8k'", ""),
    ("show metric", [("limit = 6", 'limit = 6\nshow = ["synthetic_qa/new_taught:acc"]')],
     "eval.show: 'synthetic_qa/new_taught:acc'", "has no metric 'acc'"),
    ("learning_f1 task", [("limit = 6", 'limit = 6\nlearning_f1 = "synthetic_qa/taught:f1"')],
     "eval.learning_f1: 'synthetic_qa/taught:f1'", "make no task"),
    # outputs that must be creatable
    ("out under a regular file", [('out = "outputs/studies/mini"', 'out = "{doc}/study"')],
     "study.out: '", "cannot be created: "),
    ("out is a regular file", [('out = "outputs/studies/mini"', 'out = "{doc}"')],
     "study.out: '", "is a file"),
    ("results under a regular file", [('name = "mini"', 'name = "mini"\nresults = "{doc}/r"')],
     "study.results: '", "cannot be created"),
    # types of every key
    ("checkpoint of the wrong type", [('checkpoint = "{base}"', "checkpoint = 5")],
     "base.checkpoint: expected a string; got 5", ""),
    ("out of the wrong type", [('out = "outputs/studies/mini"', "out = 5")],
     "study.out: expected a string; got 5", ""),
    ("empty out", [('out = "outputs/studies/mini"', 'out = ""')], "study.out: must not be empty", ""),
    ("name of the wrong type", [('name = "mini"', "name = 5")], "study.name: expected a string; got 5", ""),
    ("pair_seeds of the wrong type", [("base_seeds = [0]", 'base_seeds = [0]\npair_seeds = "yes"')],
     "study.pair_seeds: expected true or false; got 'yes'", ""),
    ("negative seed", [("seeds = [0, 1]", "seeds = [-1, 0]")],
     "study.seeds: seeds must be non-negative", "[-1, 0]"),
    ("negative base seed", [("base_seeds = [0]", "base_seeds = [-3]")],
     "study.base_seeds: seeds must be non-negative", ""),
    ("results of the wrong type", [('name = "mini"', 'name = "mini"\nresults = true')],
     "study.results: expected a string; got True", ""),
    ("limit as a string", [("limit = 6", 'limit = "6"')], "eval.limit: expected a positive integer", ""),
    ("zero levels", [("limit = 6", "limit = 6\nlevels = 0")], "eval.levels: expected a positive integer", ""),
    ("finetune overrides of the wrong type", [('["--training.steps=4"]', "[4]")],
     "finetune.overrides: expected a string; got 4", ""),
    ("method overrides not a list", [('overrides = ["--finetune.lora_alpha=8"]', 'overrides = "--x=1"')],
     "method.lora.overrides: expected a list of str; got '--x=1'", ""),
    ("sweep value of the wrong type", [("lr = [2.0, 20.0]", 'lr = ["fast", 20.0]')],
     "arm 0 (sparse).lr: expected a number; got 'fast'", ""),
    ("sweep value outside its choices", [('ranking = ["tfidf", "tf"]', 'ranking = ["tfidf", "tfid"]')],
     "arm 0 (sparse).ranking: expected one of", "got 'tfid'"),
    ("arm label of the wrong type", [('method = "lora"\nlr', 'method = "lora"\nlabel = 5\nlr')],
     "arm 1.label: expected a string; got 5", ""),
    ("an arm with no geometry", [('method = "lora"\nlr', 'method = "lora"\ngeometries = []\nlr')],
     "arm 1.geometries: empty", ""),
    ("background_batches below 1", [('"{base}"', '"{base}"\nbackground_batches = -1')],
     "base.background_batches: expected a positive integer", ""),
    # structure: arms, methods, base studies
    ("no arms", [("<no arms>", ""), ("<start>", "arm = []\n")], "no [[arm]] tables", ""),
    ("an arm that is not a table", [("<no arms>", ""), ("<start>", "arm = [1]\n")],
     "arm 0: expected a [[arm]] table; got 1", ""),
    ("a geometry that is not a table", [("<start>", "geometry = [1]\n")],
     "geometry 0: expected a [[geometry]] table; got 1", ""),
    ("arms repeat", [("<end>", "\n" + LORA_ARM)],
     "arms repeat: default/headline/lora-lr0.001-lora_rank2-b0-seed0", ""),
    ("missing method config", [("train_configs/debug_lora_finetune.toml", "train_configs/nope.toml")],
     "method.lora.config train_configs/nope.toml not found", ""),
    ("base study missing", [('checkpoint = "{base}"', 'study = "/nonexistent/study.toml"')],
     "base.study: '/nonexistent/study.toml' is not a file", ""),
    ("base study is itself", [('checkpoint = "{base}"', 'study = "{self}"')],
     "base.study: '", "is this study itself"),
]  # fmt: skip


def _study(tmp_path: Path, edits: list[tuple[str, str]]) -> Path:
    text = GOOD.replace('out = "outputs/studies/mini"', f'out = "{tmp_path / "out"}"')
    for old, new in edits:
        old = old.replace('"outputs/studies/mini"', f'"{tmp_path / "out"}"')
        if old == "<start>":
            text = new + text
        elif old == "<end>":
            text = text + new
        elif old == "<no arms>":
            text = text.split("[[arm]]")[0]
        else:
            assert old in text, old
            text = text.replace(old, new)
    return _write(tmp_path, text.replace("{self}", str(tmp_path / "study.toml")))


def test_the_good_study_passes(tmp_path, monkeypatch, capsys):
    path = _study(tmp_path, [])
    monkeypatch.setattr(sys, "argv", ["study", str(path), "--dry-run"])
    assert main() == 0, capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, edits, key, more", CASES, ids=[c[0] for c in CASES])
def test_a_bad_study_file_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, name, edits, key, more):
    path = _study(tmp_path, edits)
    with pytest.raises(StudyError) as err:
        load_study(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and key in msg and more in msg and "\n" not in msg, msg
    # the command line: one `error:` line, exit 2, nothing printed or written before it
    monkeypatch.setattr(sys, "argv", ["study", str(path), "--dry-run"])
    assert main() == 2
    out, errs = capsys.readouterr()
    assert out == "" and errs == f"error: {msg}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "quick, key",
    [
        ('out = 5', "quick.out: expected a string; got 5"),
        ('tasks = ["synthetic_qa", "lambada"]',
         "quick.tasks (eval.tasks under --quick): 'lambada': unknown task"),
        ('seeds = [-2]', "quick.seeds: seeds must be non-negative"),
        ('forgetting = ["synthetic_qa:f1"]',
         "quick.forgetting (eval.forgetting under --quick): 'synthetic_qa:f1'"),
    ],
)  # fmt: skip
def test_a_bad_quick_table_names_its_own_key(tmp_path, quick, key):
    path = _study(tmp_path, [("<end>", f"\n[quick]\n{quick}\n")])
    with pytest.raises(StudyError) as err:
        load_study(path, quick=True)
    assert key in str(err.value), str(err.value)


def test_facts_of_a_task_that_is_not_qa(tmp_path):
    from test_study_spec import HF_STUDY, _hf_study

    path = _hf_study(tmp_path, HF_STUDY.replace('task = "triviaqa"', 'task = "gsm8k"'))
    with pytest.raises(StudyError, match=r"facts.task: 'gsm8k' is not a QA task \(triviaqa, nq_open"):
        load_study(path)
