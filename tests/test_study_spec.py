"""Study files: arms expand to method x sweep x seed with the trainer overrides they mean; bad files give
one error line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from titan_mem.study.spec import StudyError, load_study, with_base

GOOD = """
[study]
name = "mini"
out = "outputs/studies/mini"
seeds = [0, 1]

[base]
checkpoint = "{base}"

[finetune]
config = "train_configs/debug_sparse_finetune.toml"
overrides = ["--training.steps=4"]

[eval]
tasks = ["synthetic_qa"]
every = 2
limit = 6
learning = "synthetic_qa/new_taught:answer_nll"
forgetting = ["synthetic_qa/known:f1", "perplexity:../shared/data/c4_sample_01.json.gz:nll"]

[[arm]]
method = "sparse"
lr = [2.0, 20.0]
top_t = 10
ranking = ["tfidf", "tf"]

[[arm]]
method = "lora"
lr = 1e-3
rank = [2, 4]
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "base").mkdir(exist_ok=True)
    path = tmp_path / "study.toml"
    path.write_text(text.replace("{base}", str(tmp_path / "base")))
    return path


def test_arms_expand_to_sweep_times_seeds(tmp_path):
    spec = load_study(_write(tmp_path, GOOD))
    assert len(spec.arms) == (2 * 1 * 2 + 1 * 2) * 2  # (sparse lr x ranking + lora rank) x seeds
    first = spec.arms[0]
    assert first.name == "sparse-lr2.0-top_t10-rankingtfidf-seed0"
    assert first.overrides() == [
        "--training.mode=sparse_finetune", "--optimizer.name=sgd", "--job.seed=0", "--data.seed=0",
        "--optimizer.lr=2.0", "--finetune.top_t=10", "--finetune.ranking=tfidf",
    ]  # fmt: skip
    assert spec.learning.metric == "answer_nll" and not spec.learning.higher_is_better
    assert spec.forgetting[0].higher_is_better
    assert spec.forgetting[1].task == "perplexity:../shared/data/c4_sample_01.json.gz"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (('method = "lora"', 'method = "adapter"'), "unknown method 'adapter'"),
        (('checkpoint = "{base}"', 'checkpoint = "/nonexistent/step-1"'), "base.checkpoint /nonexistent"),
        (("rank = [2, 4]", "rank = []"), "empty sweep for 'rank'"),
        (("top_t = 10", "top_k = 10"), "unknown key 'top_k'"),
        (("every = 2", "every = 2\nshots = 1"), "unknown key eval.shots"),
        (("seeds = [0, 1]", "seeds = []"), "study.seeds is empty"),
        (('learning = "synthetic_qa/new_taught:answer_nll"', 'learning = "answer_nll"'), "task:metric"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path, edit, needle):
    old, new = edit
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(StudyError) as err:
        load_study(path)
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_no_arms_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="no \\[\\[arm\\]\\] tables"):
        load_study(_write(tmp_path, GOOD.split("[[arm]]")[0]))
    with pytest.raises(StudyError, match="study file not found"):
        load_study(tmp_path / "nope.toml")


def test_quick_table_and_base_override(tmp_path):
    quick = GOOD + '\n[quick]\nseeds = [0]\nfinetune_overrides = ["--training.steps=2"]\nlimit = 2\n'
    path = _write(tmp_path, quick)
    full, fast = load_study(path), load_study(path, quick=True)
    assert (full.seeds, fast.seeds) == ([0, 1], [0])
    assert fast.finetune_overrides == ["--training.steps=4", "--training.steps=2"]  # appended: the last wins
    assert (fast.eval_limit, fast.eval_every) == (2, 2)
    assert str(fast.out) == f"{full.out}-quick" and len(fast.arms) == len(full.arms) // 2
    with pytest.raises(StudyError, match="has no \\[quick\\] table"):
        load_study(_write(tmp_path, GOOD), quick=True)
    with pytest.raises(StudyError, match="--base: /nope is not a checkpoint folder"):
        with_base(full, "/nope")
    assert with_base(full, tmp_path).base_checkpoint == tmp_path and full.pretrain_config is None
