"""tools/evaluate.py on real checkpoints and the real files of ../shared/data: every task, every training
mode's checkpoints (sparse and LoRA too), 2 ranks = 1 rank, bad input, and in-loop evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    SHARED_DATA,
    TINY,
    error_line,
    launch,
    losses,
    ok,
    read_metrics,
    run_tool,
    run_trainer,
    sparse_finetune_args,
)

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")

PERPLEXITY = [
    "c4_sample_01.json.gz",
    "c4_sample_02.json.gz",
    "c4_sample_03.json.gz",
    "cc_en_head_0091.jsonl",
    "cc_en_head_0174.jsonl",
]
# every real file of ../shared/data: the named tasks read theirs from --data-dir
ALL_TASKS = [
    "triviaqa", "nq_open", "simpleqa", "gsm8k", "hellaswag", "lambada_openai",
    "synthetic_qa", "synthetic_completion", "synthetic_prose", "synthetic_copy",
    *(f"perplexity:{SHARED_DATA / name}" for name in PERPLEXITY),
]  # fmt: skip
TAUGHT = "--data.synthetic_taught_people=4"  # of TINY's 10 new people


def evaluate(checkpoint: Path, out: Path, tasks: list[str], *extra: str, nproc: int = 1):
    args = [
        "--checkpoint", str(checkpoint), "--tasks", ",".join(tasks), "--data-dir", str(SHARED_DATA),
        "--out", str(out / "results.json"), "--predictions", str(out / "preds.jsonl"),
        "--items", str(out / "items.jsonl"), "--no-progress", *extra,
    ]  # fmt: skip
    return run_tool("evaluate.py", args, nproc=nproc)


def read_results(out: Path) -> tuple[dict, list[dict]]:
    doc = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    return doc, preds


def values(doc: dict) -> dict[tuple[str, str], float]:
    return {(r["task"], r["metric"]): r["value"] for r in doc["results"]}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained) -> dict[str, Path]:
    """A sparse finetune (sparse checkpoint) and a LoRA finetune of the shared pretraining step."""
    root = tmp_path_factory.mktemp("eval_ft")
    ok(run_trainer(sparse_finetune_args(pretrained, root / "sft", "--training.steps=2")))
    lora = [
        *TINY, f"--job.dump_folder={root / 'lora'}", "--training.mode=lora_finetune",
        f"--checkpoint.initial_load_path={pretrained}", "--finetune.lora_rank=2", "--training.steps=2",
        "--optimizer.lr=0.05",
    ]  # fmt: skip
    ok(run_trainer(lora))
    return {"sft": root / "sft/checkpoints/step-2", "lora": root / "lora/checkpoints/step-2", "root": root}


def test_every_task_on_every_real_file(pretrained, tmp_path):
    proc = ok(evaluate(pretrained, tmp_path, ALL_TASKS, "--limit", "3", TAUGHT))
    doc, preds = read_results(tmp_path)
    assert doc["step"] == 3 and doc["checkpoint"] == str(pretrained)
    got = values(doc)
    for task in ("triviaqa", "nq_open", "simpleqa"):
        assert {m for t, m in got if t == task} == {"em", "f1", "answer_nll"}
    for population in ("known_val", "known_test", "new_taught", "new_untaught"):
        for kind in ("synthetic_qa", "synthetic_completion"):
            assert 0.0 <= got[(f"{kind}/{population}", "f1")] <= 1.0
    assert {m for t, m in got if t == "synthetic_copy"} == {"em", "answer_nll"}
    assert {m for t, m in got if t == "hellaswag"} == {"acc", "acc_norm"}
    assert {m for t, m in got if t == "lambada_openai"} == {"acc", "ppl"}
    assert got[("gsm8k", "nll")] > 0
    for name in PERPLEXITY:
        assert got[(f"perplexity:{SHARED_DATA / name}", "bits_per_byte")] > 0
    for r in doc["results"]:
        assert set(r) == {"task", "metric", "value", "n", "checkpoint", "step"}
        assert r["n"] == 3  # --limit
        assert r["task"] in proc.stdout  # the table
    # predictions: one line per example with its own scores; EM/F1 re-derivable from them
    qa = [p for p in preds if p["task"] == "triviaqa"]
    assert len(qa) == 3 and all({"prompt", "prediction", "references", "em", "f1"} <= set(p) for p in qa)
    assert qa[0]["prompt"].startswith("Question: ") and qa[0]["prompt"].endswith("\nAnswer:")
    assert got[("triviaqa", "f1")] == pytest.approx(sum(p["f1"] for p in qa) / 3)
    # --items: the per-item scores as one eval_items line at step 0, every task, each item
    (line,) = (tmp_path / "items.jsonl").read_text().splitlines()
    items = json.loads(line)
    assert items["step"] == 0 and set(items["tasks"]) == {t for t, _ in got}
    assert all(len(col) == 3 for t in items["tasks"].values() for col in t.values())
    known = items["tasks"]["synthetic_qa/known_val"]
    assert set(known) == {"id", "group", "em", "f1", "answer_nll", "tokens"}
    assert got[("synthetic_qa/known_val", "f1")] == sum(known["f1"]) / 3
    weighted = sum(a * n for a, n in zip(known["answer_nll"], known["tokens"])) / sum(known["tokens"])
    assert got[("synthetic_qa/known_val", "answer_nll")] == pytest.approx(weighted, rel=1e-12)


def test_two_ranks_give_the_numbers_of_one(pretrained, tmp_path):
    tasks = ["triviaqa", "hellaswag", "gsm8k"]  # generation, multiple choice, NLL
    one, two = tmp_path / "one", tmp_path / "two"
    ok(evaluate(pretrained, one, tasks, "--limit", "5", "--batch-size", "2"))  # 3 batches: uneven ranks
    ok(evaluate(pretrained, two, tasks, "--limit", "5", "--batch-size", "2", nproc=2))
    (d1, p1), (d2, p2) = read_results(one), read_results(two)
    assert values(d1) == values(d2)  # bit for bit: every example runs in the same batch
    assert p1 == p2 and d2["world_size"] == 2


def test_sparse_and_lora_checkpoints_evaluate_as_their_exported_models(finetuned, pretrained, tmp_path):
    tasks = ["synthetic_qa", "gsm8k"]  # generation, and NLL (moves with any weight change)
    base_cfg = str(pretrained.parent.parent / "config.json")
    for kind, merge in (("sft", []), ("lora", ["--merge-lora", "--lora-alpha", "32"])):
        exported = tmp_path / f"{kind}_exported"
        ok(run_tool("convert_checkpoint.py", ["export-model", str(finetuned[kind]), str(exported), *merge]))
        a, b = tmp_path / f"{kind}_a", tmp_path / f"{kind}_b"
        ok(evaluate(finetuned[kind], a, tasks, "--limit", "4", TAUGHT))
        ok(evaluate(exported, b, tasks, "--limit", "4", TAUGHT, "--config", base_cfg))
        (da, pa), (db, pb) = read_results(a), read_results(b)
        if kind == "sft":  # base + patch: the same tensors, the same numbers
            assert values(da) == values(db)
        else:  # merged adapters: the same function up to rounding
            assert values(da) == pytest.approx(values(db), rel=1e-4)
        assert [p["prediction"] for p in pa] == [p["prediction"] for p in pb]


@pytest.mark.parametrize(
    "case",
    [
        "unknown_task",
        "missing_file",
        "malformed_line",
        "other_model",
        "limit",
        "out_under_a_file",
        "same_file",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, pretrained, tmp_path):
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": \n')
    empty = tmp_path / "empty"
    empty.mkdir()
    tasks, extra, needle = {
        "unknown_task": (["triviaqa", "trivia_qa"], [], "unknown task 'trivia_qa'"),
        "missing_file": (["nq_open"], ["--data-dir", str(empty)], f"missing data file {empty}/nq_open_dev"),
        "malformed_line": ([f"nq_open:{bad}"], [], f"{bad}:2: invalid JSON line"),
        "other_model": (["hellaswag"], ["--model.dim=32"], "shape"),
        "limit": (["hellaswag"], ["--limit", "0"], "--limit"),
        # outputs are checked before the model loads
        "out_under_a_file": (
            ["hellaswag"],
            ["--items", str(tmp_path / "a_file" / "i.jsonl")],
            "a_file is a file",
        ),
        "same_file": (["hellaswag"], ["--predictions", str(tmp_path / "r.json")], "two name the same file"),
    }[case]
    args = ["--checkpoint", str(pretrained), "--tasks", ",".join(tasks), "--out", str(tmp_path / "r.json")]
    if "--data-dir" not in extra:
        args += ["--data-dir", str(SHARED_DATA)]
    proc = run_tool("evaluate.py", [*args, *extra])
    error_line(proc, needle, alone=True)
    assert not (tmp_path / "r.json").exists()


def test_in_loop_evaluation_logs_metrics_and_leaves_training_alone(pretrained, tmp_path):
    common = [*TINY, "--training.steps=2", "--checkpoint.enable=false"]
    plain, evald = tmp_path / "plain", tmp_path / "eval"
    ok(run_trainer([*common, f"--job.dump_folder={plain}"]))
    ev = ["--eval.tasks=synthetic_qa,hellaswag", "--eval.every=1", "--eval.limit=3",
          f"--eval.data_dir={SHARED_DATA}"]  # fmt: skip
    ok(run_trainer([*common, f"--job.dump_folder={evald}", *ev]))
    assert losses(plain) == losses(evald)  # evaluation between steps changes nothing in training
    records = [r for r in read_metrics(evald) if "eval/hellaswag/acc_norm" in r]
    assert [r["step"] for r in records] == [0, 1, 2]
    key = "eval/synthetic_qa/known_val/answer_nll"
    assert all(key in r for r in records)
    assert records[0][key] != records[-1][key]  # it evaluates the model as it trains
    items = [json.loads(line) for line in (evald / "eval_items.jsonl").read_text().splitlines()]
    assert [r["step"] for r in items] == [0, 1, 2]  # one line per evaluation point
    logged = {k.removeprefix("eval/").rsplit("/", 1)[0] for k in records[0] if k.startswith("eval/")}
    assert set(items[0]["tasks"]) == logged
    assert not (plain / "eval_items.jsonl").exists()


def test_generate_cli_says_what_the_evaluation_predicted(pretrained, tmp_path):
    """`python -m titan_mem.generate` on a prompts file gives the evaluation's own predictions."""
    ok(evaluate(pretrained, tmp_path, ["synthetic_qa"], "--limit", "2"))
    preds = read_results(tmp_path)[1][:2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in preds))
    out = tmp_path / "gen.jsonl"
    args = ["--checkpoint", str(pretrained), "--prompts-file", str(prompts), "--stop", "\\n"]
    proc = launch(["-m", "titan_mem.generate", *args, "--max-new-tokens", "32", "--out", str(out)])
    ok(proc)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [p["prompt"] for p in preds]
    assert [g["completion"].strip() for g in got] == [p["prediction"] for p in preds]
    assert preds[0]["prompt"] in proc.stdout


def test_outputs_are_written_together_or_not_at_all(pretrained, tmp_path, monkeypatch):
    """The disk fills while the last of the three outputs is written: none of them appears (each was
    written to its temporary name first), no temporary file stays, and the command says why in one line."""
    write_text = Path.write_text

    def full_disk_for_results(self, *args, **kwargs):
        if self.name.startswith("results.json"):
            raise OSError(28, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk_for_results)
    proc = evaluate(pretrained, tmp_path, ["synthetic_qa"], "--limit", "2")
    error_line(proc, "results.json", "No space left", alone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
