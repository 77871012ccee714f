"""Study files: each method starts from its own finetuning config, arms expand to method x sweep x geometry
x (base seed, order seed), every method of a group gets the same budget, evaluation is log-spaced; bad files
give one error line naming the file and the key. The shipped studies (headline, ablations with the document
regime, the 1.3B one) plan: every arm's trainer config passes the trainer's checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from titan_mem import config as config_mod
from titan_mem.study.runner import plan
from titan_mem.study.spec import StudyError, eval_steps, load_study
from titan_mem.study.subset import only_arms, only_geometries, only_groups, with_base

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[study]
name = "mini"
out = "outputs/studies/mini"
seeds = [0, 1]
base_seeds = [0]

[base]
checkpoint = "{base}"

[method.sparse]
config = "train_configs/debug_sparse_finetune.toml"

[method.lora]
config = "train_configs/debug_lora_finetune.toml"
overrides = ["--finetune.lora_alpha=8"]

[finetune]
overrides = ["--training.steps=4"]

[eval]
tasks = ["synthetic_qa", "perplexity:{doc}"]
every = 2
limit = 6
learning = "synthetic_qa/new_taught:answer_nll"
control = "synthetic_qa/new_untaught:answer_nll"
forgetting = ["synthetic_qa/known_{split}:f1", "perplexity:{doc}:nll"]

[[arm]]
method = "sparse"
lr = [2.0, 20.0]
top_t = 10
ranking = ["tfidf", "tf"]

[[arm]]
method = "lora"
lr = [1e-3, 1e-2]
lora_rank = [2, 4]
"""


def _write(tmp_path: Path, text: str) -> Path:
    """The study file, with {base} = a step folder whose run has a resolved config (as a real base has) and
    {doc} = a small documents file (what a perplexity task reads)."""
    step = tmp_path / "run" / "checkpoints" / "step-1"
    if not step.is_dir():
        step.mkdir(parents=True)
        config_mod.dump(
            config_mod.parse_args([str(REPO / "train_configs/debug_model.toml")]),
            step.parent.parent / "config.json",
        )
    doc = tmp_path / "docs.jsonl"
    if not doc.is_file():
        doc.write_text('{"text": "A short document."}\n')
    path = tmp_path / "study.toml"
    path.write_text(text.replace("{base}", str(step)).replace("{doc}", str(doc)))
    return path


def test_arms_expand_to_sweep_times_seeds(tmp_path):
    spec = load_study(_write(tmp_path, GOOD))
    assert len(spec.arms) == (2 * 2 + 2 * 2) * 2  # (sparse lr x ranking, lora lr x rank) x seeds
    first = spec.arms[0]
    assert first.name == "sparse-lr2.0-top_t10-rankingtfidf-b0-seed0"
    assert first.overrides() == [
        "--job.seed=0", "--data.seed=0", "--optimizer.lr=2.0", "--finetune.top_t=10",
        "--finetune.ranking=tfidf",
    ]  # fmt: skip
    assert {a.mode for a in spec.arms} == {"sparse_finetune", "lora_finetune"}
    assert spec.learning.metric == "answer_nll" and not spec.learning.higher_is_better
    assert [str(r) for r in spec.forgetting_refs("test")][0] == "synthetic_qa/known_test:f1"
    assert spec.forgetting_refs("val")[1].task == f"perplexity:{tmp_path / 'docs.jsonl'}"  # a ':' in a task


def test_each_method_reaches_its_arms_with_its_own_optimizer(tmp_path, monkeypatch):
    """The baselines run their own configs (AdamW, wd 0, clipping), not the sparse config's optimizer."""
    monkeypatch.chdir(REPO)
    spec = load_study(_write(tmp_path, GOOD))
    jobs = plan(spec)
    resolved = {}
    for job in jobs:
        if job.arm is not None:
            argv = job.cmd.argv[3:]
            resolved[job.arm.method] = config_mod.parse_args(argv)
    sparse, lora = resolved["sparse"], resolved["lora"]
    assert (sparse.optimizer.name, sparse.training.max_norm) == ("sgd", 0.0)
    assert (lora.optimizer.name, lora.optimizer.weight_decay, lora.training.max_norm) == ("adamw", 0.0, 1.0)
    assert lora.finetune.lora_alpha == 8.0 and lora.training.mode == "lora_finetune"
    assert sparse.training.steps == lora.training.steps == 4  # the shared stream reaches every method
    assert sparse.eval.at_steps == [2, 4] and sparse.eval.every == 0


def test_unequal_budgets_are_refused(tmp_path):
    text = GOOD.replace("lora_rank = [2, 4]", "lora_rank = [2, 4, 8]")
    with pytest.raises(StudyError, match=r"unequal search budgets \(sparse 4, lora 6 configurations\)"):
        load_study(_write(tmp_path, text))
    # another group may have its own budget
    text = GOOD + '\n[[arm]]\ngroup = "extra"\nmethod = "sparse"\nlr = 1.0\n'
    assert {a.group for a in load_study(_write(tmp_path, text)).arms} == {"headline", "extra"}


def test_log_spaced_evaluation_steps(tmp_path):
    spec = load_study(_write(tmp_path, GOOD.replace("every = 2", "points = 8")))
    assert eval_steps(spec, 120) == [1, 2, 4, 8, 15, 31, 61, 120]  # round(120 ** (i / 7))
    assert eval_steps(spec, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(StudyError, match="points .* or every, not both"):
        load_study(_write(tmp_path, GOOD.replace("every = 2", "every = 2\npoints = 3")))


def test_only_some_geometries(tmp_path):
    text = GOOD + '\n[[geometry]]\nname = "A"\n\n[[geometry]]\nname = "B"\n'
    spec = only_geometries(load_study(_write(tmp_path, text)), ["B"])
    assert [g.name for g in spec.geometries] == ["B"] and {a.geometry for a in spec.arms} == {"B"}
    with pytest.raises(StudyError, match="--geometry: 'C' is not a geometry"):
        only_geometries(spec, ["C"])
    text += '\n[[arm]]\ngroup = "extra"\nmethod = "sparse"\nlr = 1.0\n'
    spec = only_groups(load_study(_write(tmp_path, text)), ["extra"])
    assert {a.group for a in spec.arms} == {"extra"} and len(spec.arms) == 2 * 2  # seeds x geometries
    with pytest.raises(StudyError, match="--group: 'nope' is not a group"):
        only_groups(spec, ["nope"])
    spec = only_arms(load_study(_write(tmp_path, GOOD)), ["lora-lr0.001-lora_rank4-b0-seed1"])
    assert [(a.method, a.params, a.seed) for a in spec.arms] == [
        ("lora", (("lr", 0.001), ("lora_rank", 4)), 1)
    ]
    not_an_arm = "--arm: 'lora-lr9' is not an arm .* \\(e.g. lora-lr0.001-lora_rank2-b0"
    with pytest.raises(StudyError, match=not_an_arm):
        only_arms(load_study(_write(tmp_path, GOOD)), ["lora-lr9"])


def test_geometries_and_paired_base_seeds(tmp_path):
    text = GOOD.replace('checkpoint = "{base}"', 'pretrain_config = "train_configs/debug_model.toml"')
    text = text.replace("base_seeds = [0]", "base_seeds = [3, 4]\npair_seeds = true")
    text += (
        '\n[[geometry]]\nname = "4K"\noverrides = ["--model.memory_n_keys=64"]\n'
        'arm_overrides = ["--finetune.top_t=5"]\n'
        '\n[[geometry]]\nname = "65K"\noverrides = ["--model.memory_n_keys=256"]\n'
    )
    spec = load_study(_write(tmp_path, text))
    assert [(a.base_seed, a.seed) for a in spec.arms[:2]] == [(3, 0), (4, 1)]  # zipped, not crossed
    assert {a.geometry for a in spec.arms} == {"4K", "65K"} and len(
        spec.arms
    ) == 8 * 2 * 2  # configs x run sets x geometries
    bad = text.replace('overrides = ["--model.memory_n_keys=256"]', 'overrides = ["--training.steps=2"]')
    with pytest.raises(StudyError, match="only --model"):
        load_study(_write(tmp_path, bad))


@pytest.mark.parametrize(
    "edit, needle",
    [
        (('method = "lora"\nlr', 'method = "adapter"\nlr'), "unknown method 'adapter'"),
        (('checkpoint = "{base}"', 'checkpoint = "/nonexistent/step-1"'), "base.checkpoint /nonexistent"),
        (("lora_rank = [2, 4]", "lora_rank = []"), "empty sweep for 'lora_rank'"),
        (("top_t = 10", "top_k = 10"), "unknown key 'top_k'"),
        (("every = 2", "every = 2\nfewshot = 1"), "unknown key eval.fewshot"),
        (("seeds = [0, 1]", "seeds = []"), "study.seeds must be a non-empty list"),
        (('learning = "synthetic_qa/new_taught:answer_nll"', 'learning = "answer_nll"'), "task:metric"),
        (('config = "train_configs/debug_lora_finetune.toml"', 'config = "nope.toml"'), "method.lora.config"),
        (('config = "train_configs/debug_lora_finetune.toml"', 'config = "train_configs/debug_model.toml"'),
         "is a pretraining config"),
        (("[finetune]", '[base.x]\n[finetune]'), "unknown key base.x"),
    ],
)  # fmt: skip
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
    quick = (
        GOOD
        + '\n[quick]\nseeds = [0]\nfinetune_overrides = ["--training.steps=2"]\nlimit = 2\nmax_sweep = 1\n'
    )
    path = _write(tmp_path, quick)
    full, fast = load_study(path), load_study(path, quick=True)
    assert (full.seeds, fast.seeds) == ([0, 1], [0])
    assert fast.finetune_overrides == ["--training.steps=4", "--training.steps=2"]  # appended: the last wins
    assert (fast.eval_limit, fast.eval_every) == (2, 2)
    assert str(fast.out) == f"{full.out}-quick" and len(fast.arms) == 2  # first value of each sweep
    with pytest.raises(StudyError, match="has no \\[quick\\] table"):
        load_study(_write(tmp_path, GOOD), quick=True)
    with pytest.raises(StudyError, match="--base: /nope is not a checkpoint folder"):
        with_base(full, "/nope")
    assert with_base(full, tmp_path).base_checkpoint == tmp_path and full.pretrain_config is None


def _counts_of(jobs) -> dict[str, str]:
    """arm name -> the background kind of the counts file it reads (None: no counts)."""
    out = {}
    for job in jobs:
        if job.arm is not None:
            counts = [a for a in job.cmd.argv if a.startswith("--finetune.background_counts=")]
            out[job.arm.series] = counts[0].split("counts-")[1].split("-")[0] if counts else None
    return out


@pytest.mark.parametrize(
    "name",
    [
        "synthetic_facts",
        "ablations",
        "triviaqa_1b",
        "retrofit_synthetic",
        "retrofit_qwen2.5_0.5b",
        "smollm2_triviaqa",
    ],
)
def test_shipped_studies_plan(name, monkeypatch):
    """The shipped study files load and every arm's trainer config passes its checks (--dry-run)."""
    monkeypatch.chdir(REPO)
    needs_data = ("smollm2_triviaqa", "triviaqa_1b", "retrofit_qwen2.5_0.5b")  # eval.data_dir, facts.source
    if name in needs_data and not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (its evaluation data) is not on this machine")
    for quick in (False, True):
        spec = load_study(f"studies/{name}.toml", quick=quick)
        jobs = plan(spec)
        assert sum(j.arm is not None for j in jobs) == len(spec.arms)
        if name == "synthetic_facts":
            assert {a.series for a in spec.arms} == {
                "sparse",
                "sparse_mass",
                "sparse_poisson",
                "full",
                "lora",
            }
            assert {a.geometry for a in spec.arms} == {"4K", "65K", "1M"}
        if name == "smollm2_triviaqa":  # the real-model study: 6 series x 3 lrs x 2 seeds, 1 x 1 quick
            series = {"sparse", "sparse_tf", "sparse_adamw", "full_retrofit", "full", "lora"}
            assert {a.series for a in spec.arms} == series and len(spec.arms) == (6 if quick else 36)
            assert (spec.results is None) == quick and spec.reference == "hf"
            arms = [j.arm for j in jobs if j.arm is not None]
            for job in (j for j in jobs if j.arm is not None):
                heal = any("heal-b0" in a for a in job.cmd.argv if a.startswith("--checkpoint.initial_load"))
                assert heal == (job.arm.start != "hf"), job.name  # baselines start from the model as it is
            # run order: seed by seed, every series' first configuration before any series' second
            assert [a.seed for a in arms] == sorted(a.seed for a in arms)
            assert {a.series for a in arms[:6]} == series and (quick or arms[0].params != arms[6].params)
        if name == "ablations":
            assert {"ranking_t50", "ranking_t500", "optimizer", "background", "documents"} <= set(spec.groups)
            kinds = _counts_of([j for j in jobs if j.arm is not None and j.arm.group == "background"])
            # the background key changes the counts an arm reads; TF-only reads none
            assert kinds == {
                "pretrain": "pretrain",
                "finetune": "finetune",
                "heldout": "heldout",
                "none": None,
            }
            docs = [j for j in jobs if j.arm is not None and j.arm.group == "documents"]
            cfg = config_mod.parse_args(docs[0].cmd.argv[3:])
            assert (cfg.data.regime, cfg.data.synthetic_article_sections, cfg.finetune.top_t) == (
                "documents",
                8,
                2500,
            )
            assert any("counts-pretrain-1x128" in a for a in docs[0].cmd.argv)  # its own batch shape


HF_BASE = """
[[geometry]]
name = "replace"
retrofit = ["--retrofit.mode=replace", "--retrofit.layers=1", "--model.memory_n_keys=16"]
heal_config = "train_configs/debug_heal.toml"
"""


def test_retrofit_geometries_of_a_given_hf_model(tmp_path):
    """[base] hf_model: every geometry retrofits it; the plan heals first (no pretraining, no export), and
    every later command reads the retrofitted model; the pieces that must go together are checked."""
    text = GOOD.replace('checkpoint = "{base}"', 'hf_model = "org/model"').replace(
        "[method.sparse]", HF_BASE + "\n[method.sparse]"
    )
    spec = load_study(_write(tmp_path, text))
    jobs = plan(spec)
    assert jobs[0].name == "heal base replace/b0" and not any(
        j.name.startswith(("pretrain", "export")) for j in jobs
    )
    assert "--retrofit.base=org/model" in jobs[0].cmd.argv
    assert all(
        "--retrofit.base=org/model" in j.cmd.argv and "--retrofit.layers=1" in j.cmd.argv for j in jobs
    )
    bad = {
        "a geometry without retrofit keys runs the model as it is": text.replace(
            "[[geometry]]", '[[geometry]]\nname = "plain"\noverrides = ["--model.dim=8"]\n\n[[geometry]]', 1
        ),
        "retrofit and heal_config go together": text.replace(
            'heal_config = "train_configs/debug_heal.toml"', ""
        ),
        "only --retrofit.* and --model.memory_* keys": text.replace(
            '"--retrofit.layers=1"', '"--model.dim=8"'
        ),
        "heal_config: 'nope.toml' is not a file": text.replace("train_configs/debug_heal.toml", "nope.toml"),
        "needs base.pretrain_config or base.hf_model": text.replace(
            'hf_model = "org/model"', 'checkpoint = "{base}"'
        ),
    }
    for needle, study in bad.items():
        with pytest.raises(
            StudyError, match=needle.replace("*", r"\*").replace("[", r"\[").replace("]", r"\]")
        ):
            load_study(_write(tmp_path, study))


HF_STUDY = """
[study]
name = "hf"
out = "{out}"
results = "{results}"
seeds = [0]

[base]
hf_model = "org/model"
reference = "hf"

[facts]
task = "triviaqa"
source = "{source}"
candidates = 20
shots = 0
splits = {train = 4, control = 2}
out = "{facts}"

[[geometry]]
name = "add"
retrofit = ["--retrofit.mode=add", "--retrofit.layers=1", "--model.memory_n_keys=16"]
heal_config = "train_configs/debug_heal.toml"

[method.sparse]
config = "train_configs/debug_sparse_finetune.toml"

[method.full]
config = "train_configs/debug_full_finetune.toml"

[finetune]
overrides = ["--training.steps=4", "--data.source={facts}/train.jsonl", "--data.regime=qa"]

[eval]
tasks = ["triviaqa:{facts}/train_eval.jsonl@limit=4@label=taught", "nq_open@shots=0"]
every = 2
limit = 6
learning = "triviaqa/taught:answer_nll"
forgetting = ["nq_open:answer_nll"]

[[arm]]
method = "sparse"
lr = [10.0]

[[arm]]
method = "full"
label = "full_retrofit"
lr = [1e-4]

[[arm]]
method = "full"
start = "hf"
lr = [1e-4]

[quick]
heal_overrides = ["--training.steps=1"]
"""


def _hf_study(tmp_path: Path, text: str = HF_STUDY) -> Path:
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(f'{{"question": "q{i}?", "answer": "a{i}", "id": "t{i}"}}\n' for i in range(30))
    )
    path = tmp_path / "hf.toml"
    for key, value in (("{out}", tmp_path / "out"), ("{results}", tmp_path / "committed"),
                       ("{source}", source), ("{facts}", tmp_path / "facts")):  # fmt: skip
        text = text.replace(key, str(value))
    path.write_text(text)
    return path


def test_arms_on_the_hf_model_as_it_is_beside_its_retrofit(tmp_path):
    """An HF study: facts chosen first; the base record is the HF model as it is (reference = "hf") and the
    healed retrofit is evaluated beside it; an arm with start = "hf" finetunes the HF model without memory
    layers or the heal (it waits for nothing but the facts), the others read the healed retrofit."""
    spec = load_study(_hf_study(tmp_path))
    jobs = {j.name: j for j in plan(spec)}
    assert list(jobs)[:4] == [
        "choose facts",
        "heal base add/b0",
        "evaluate base add/b0",
        "evaluate healed add/b0",
    ]
    facts = jobs["choose facts"].cmd.argv
    assert facts[facts.index("--out") + 1] == str(tmp_path / "facts" / "facts.json")
    base, healed = jobs["evaluate base add/b0"].cmd.argv, jobs["evaluate healed add/b0"].cmd.argv
    assert base[base.index("--base") + 1] == "org/model" and "--retrofit.layers=[]" in base
    assert jobs["evaluate base add/b0"].deps == ["choose facts"]
    assert "heal-b0" in healed[healed.index("--base") + 1] and "--retrofit.layers=1" in healed
    hf_arm = next(j for n, j in jobs.items() if n.startswith("add/headline/full-"))
    assert hf_arm.deps == ["choose facts"] and "--retrofit.layers=[]" in hf_arm.cmd.argv
    assert not any(a.startswith("--checkpoint.initial_load_path=" + str(tmp_path)) for a in hf_arm.cmd.argv)
    retro = next(j for n, j in jobs.items() if n.startswith("add/headline/full_retrofit-"))
    assert any("heal-b0" in a for a in retro.cmd.argv if a.startswith("--checkpoint.initial_load_path="))
    assert retro.deps == ["heal base add/b0", "choose facts"]
    assert load_study(_hf_study(tmp_path), quick=True).results is None  # a smoke run commits nothing
    bad = {
        "arm 3: start = 'hf' runs base.hf_model without memory": HF_STUDY
        + '\n[[arm]]\nmethod = "sparse"\nlabel = "x"\nstart = "hf"\nlr = [1.0]\n',
        "base.reference: expected one of healed, hf; got 'x'": HF_STUDY.replace(
            'reference = "hf"', 'reference = "x"'
        ),
        "unknown key facts.nope": HF_STUDY.replace("candidates = 20", "nope = 1"),
        "facts.splits.train: expected a positive integer": HF_STUDY.replace("train = 4", "train = 0"),
    }
    for needle, text in bad.items():
        with pytest.raises(StudyError, match=re.escape(needle)):
            load_study(_hf_study(tmp_path, text))


def test_every_sweep_key_names_a_trainer_config_key():
    import dataclasses

    from titan_mem.config import MODES, Config
    from titan_mem.study.keys import sweep_keys

    sections = {
        f.name: {g.name for g in dataclasses.fields(f.default_factory)} for f in dataclasses.fields(Config)
    }
    for mode in MODES:
        if mode.endswith("finetune"):
            for sweep, target in sweep_keys(mode).items():
                section, key = target.split(".")
                assert key in sections[section], (mode, sweep, target)
