"""The study runner end to end on a micro study (seconds): base pretraining, background counts, base
evaluation, three arms in parallel subprocesses, results, report and plots; a rerun skips every finished
arm and reruns only an arm whose record is gone; an arm whose config the trainer refuses stops the study
before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titan_mem.study.runner import plan
from titan_mem.study.spec import StudyError, load_study

REPO = Path(__file__).resolve().parents[1]

MICRO = """
[study]
name = "micro"
out = "{out}"
seeds = [0]

[base]
pretrain_config = "train_configs/debug_model.toml"
pretrain_overrides = ["--training.steps=3", "--data.synthetic_known_people=6", "--data.synthetic_qa_people=3",
  "--data.synthetic_new_people=2", "--checkpoint.interval=3", "--metrics.log_freq=3",
  "--training.global_batch_size=4", "--training.micro_batch_size=4", "--training.seq_len=64"]
background_batches = 3

[finetune]
config = "train_configs/debug_sparse_finetune.toml"
overrides = ["--data.synthetic_taught_people=1", "--training.steps=2", "--training.global_batch_size=4",
  "--training.micro_batch_size=4", "--metrics.log_freq=1", "--eval.batch_size=8"]

[eval]
tasks = ["synthetic_qa", "synthetic_prose"]
every = 1
limit = 2
learning = "synthetic_qa/new_taught:answer_nll"
forgetting = ["synthetic_qa/known:answer_nll", "synthetic_prose:nll"]
show = ["synthetic_qa/new_taught:f1"]

[[arm]]
method = "sparse"
lr = 50.0
top_t = 8

[[arm]]
method = "full"
lr = 1e-3

[[arm]]
method = "lora"
lr = 1e-2
rank = 2
"""


def _study(tmp_path: Path, text: str = MICRO) -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(text.replace("{out}", str(tmp_path / "out")))
    return path


def _run(study: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "titan_mem.study", str(study), "--jobs", "2", "--threads", "1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_micro_study_end_to_end_then_resume(tmp_path):
    study = _study(tmp_path)
    first = _run(study)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    base = [r for r in records if r["arm"] == "base"]
    arms = [r for r in records if r["arm"] != "base"]
    assert len(base) == 1 and base[0]["step"] == 0
    assert sorted({r["method"] for r in arms}) == ["full", "lora", "sparse"]
    assert sorted(r["step"] for r in arms) == [1, 1, 1, 2, 2, 2]  # every=1 over 2 steps, per arm
    for r in arms:
        assert set(r["metrics"]) == set(base[0]["metrics"])
        assert "synthetic_qa/new_taught:answer_nll" in r["metrics"]
    sparse = [r for r in arms if r["method"] == "sparse"]
    assert all(0 < r["rows_per_step"] <= 8 for r in sparse)
    # full finetuning at lr 1e-3 moves every weight: its held-out NLL differs from the base's
    full_last = max((r for r in arms if r["method"] == "full"), key=lambda r: r["step"])
    key = "synthetic_qa/known:answer_nll"
    assert full_last["metrics"][key] != base[0]["metrics"][key]
    report = (out / "report.md").read_text()
    assert "## Forgetting at matched learning" in report
    assert "| sparse | lr=50.0, top_t=8 | 1 | 2 | 8" in report
    for png in ("curves.png", "tradeoff.png", "matched.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: everything is done, nothing runs again
    done = {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/arm.json")}
    assert len(done) == 3
    second = _run(study)
    assert second.returncode == 0, second.stderr
    assert "3 of 3 arms done before, skipped" in second.stdout
    assert "pretrain base: done before" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in done} == done

    # an arm that died half-way (no arm.json) runs again, alone
    lora = next(p for p in done if "lora" in str(p))
    lora.unlink()
    (lora.parent / "metrics.jsonl").write_text('{"step": 1, "eval/x/em": 0.5}\n')  # stale partial output
    third = _run(study)
    assert third.returncode == 0, third.stderr
    assert "2 of 3 arms done before, skipped" in third.stdout and "arm 1/1 lora" in third.stdout
    others = {p: t for p, t in done.items() if p != lora}
    assert {p: p.stat().st_mtime_ns for p in others} == others
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert again == records  # the rerun arm reproduces its numbers; the stale partial output is gone


def test_an_arm_the_trainer_refuses_stops_the_study_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = _study(tmp_path, MICRO.replace("lr = 1e-2\nrank = 2", "lr = 1e-2\nrank = 0"))
    spec = load_study(study)
    with pytest.raises(StudyError, match=r"arm lora-lr0.01-rank0-seed0: finetune.lora_rank: must be"):
        plan(spec)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["synthetic_facts", "triviaqa_1b"])
def test_shipped_studies_plan(name, monkeypatch):
    """The shipped study files load, every arm's trainer config passes its checks (what --dry-run does)."""
    monkeypatch.chdir(REPO)
    for quick in (False, True):
        spec = load_study(f"studies/{name}.toml", quick=quick)
        commands = plan(spec)
        assert len(commands) == 3 + len(spec.arms)  # pretrain, counts, base eval, arms
        assert {a.method for a in spec.arms} == {"sparse", "full", "lora"}
        assert any(dict(a.params).get("rule") == "mass" for a in spec.arms)  # the adaptive-t arm
