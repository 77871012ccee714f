"""The study runner end to end on a micro study (seconds): base pretraining, background counts, base
evaluation, arms of three methods in parallel subprocesses, results with per-item scores and each arm's
resolved settings, report and plots; a rerun skips every finished job and reruns only an arm whose record is
gone; an arm whose config the trainer refuses stops the study before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titan_mem.study.runner import Job, _run_jobs, plan
from titan_mem.study.spec import StudyError, load_study
from titan_mem.study.stages import Command, Layout

REPO = Path(__file__).resolve().parents[2]

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

[method.sparse]
config = "train_configs/debug_sparse_finetune.toml"

[method.full]
config = "train_configs/debug_full_finetune.toml"

[method.lora]
config = "train_configs/debug_lora_finetune.toml"

[finetune]
overrides = ["--data.synthetic_taught_people=1", "--training.steps=2", "--training.global_batch_size=4",
  "--training.micro_batch_size=4", "--metrics.log_freq=1", "--eval.batch_size=8"]

[eval]
tasks = ["synthetic_qa", "synthetic_prose", "synthetic_copy"]
points = 2
limit = 8
learning = "synthetic_qa/new_taught:answer_nll"
control = "synthetic_qa/new_untaught:answer_nll"
forgetting = ["synthetic_qa/known_{split}:answer_nll", "synthetic_prose:nll", "synthetic_copy:answer_nll"]
show = ["synthetic_qa/new_taught:f1"]
bootstrap = 50

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
lora_rank = 2

[[arm]]  # the background corpus as an ablation: counts over the finetuning stream itself
group = "background"
method = "sparse"
label = "finetune"
background = "finetune"
lr = 50.0
top_t = 8
"""


def _study(tmp_path: Path, text: str = MICRO) -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(text.replace("{out}", str(tmp_path / "out")))
    return path


def _run(study: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "titan_mem.study", str(study), "--jobs", "2", "--threads", "1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.heavy
def test_micro_study_end_to_end_then_resume(tmp_path):
    study = _study(tmp_path)
    first = _run(study)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    base = [r for r in records if r["arm"] == "base"]
    arms = [r for r in records if r["arm"] != "base" and r["group"] == "headline"]
    assert len(base) == 1 and base[0]["step"] == 0 and base[0]["geometry"] == "default"
    assert sorted({r["method"] for r in arms}) == ["full", "lora", "sparse"]
    assert sorted(r["step"] for r in arms) == [1, 1, 1, 2, 2, 2]  # 2 log-spaced points over 2 steps
    for r in arms:
        assert set(r["metrics"]) == set(base[0]["metrics"])
        assert set(r["items"]) == set(base[0]["items"])  # per-item scores of every task, base included
        assert len(r["items"]["synthetic_qa/known_test"]["answer_nll"]) > 0
    # each arm ran its own method's optimizer, recorded as resolved
    resolved = {r["method"]: r["resolved"] for r in arms}
    assert resolved["sparse"]["optimizer"]["name"] == "sgd" and resolved["sparse"]["max_norm"] == 0.0
    assert resolved["full"]["optimizer"]["name"] == "adamw" and resolved["full"]["max_norm"] == 1.0
    assert resolved["full"]["optimizer"]["weight_decay"] == 0.0
    sparse = [r for r in arms if r["method"] == "sparse"]
    assert all(
        0 < r["rows_per_step"] <= 8 and r["selection"]["union_rows"] >= r["rows_per_step"] for r in sparse
    )
    assert all(r["taught_order"] for r in arms)
    report = (out / "report.md").read_text()
    assert "Memory geometry and selection" in report and "Resolved settings" in report
    assert list(out.glob("*.png")) and json.loads((out / "summary.json").read_text())

    # the background key changes the counts: the stream's own slots, not the pretraining data's
    from titan_mem.sparse.counts import load_background_counts

    files = out / "default" / "base-b0-files"
    pre, own = (
        load_background_counts(files / f"counts-{k}-4x64.safetensors") for k in ("pretrain", "finetune")
    )
    layer = pre.layers[0]
    assert not (pre.df[layer] == own.df[layer]).all()
    bg_arm = next(r for r in records if r["group"] == "background")
    assert "counts-finetune-4x64" in bg_arm["resolved"]["finetune"]["background_counts"]

    # resume: everything is done, nothing runs again
    done = {p: p.stat().st_mtime_ns for p in out.glob("default/arms/*/*/arm.json")}
    assert len(done) == 4
    second = _run(study)
    assert second.returncode == 0, second.stderr
    assert "8 of 8 jobs done before, skipped" in second.stdout  # pretrain, 2 counts, base eval, 4 arms
    assert {p: p.stat().st_mtime_ns for p in done} == done

    # an arm that died half-way (no arm.json) runs again, alone
    lora = next(p for p in done if "lora" in str(p))
    lora.unlink()
    (lora.parent / "metrics.jsonl").write_text('{"step": 1, "eval/x/em": 0.5}\n')  # stale partial output
    third = _run(study)
    assert third.returncode == 0, third.stderr
    assert "7 of 8 jobs done before, skipped" in third.stdout and "1/1 default/headline/lora" in third.stdout
    others = {p: t for p, t in done.items() if p != lora}
    assert {p: p.stat().st_mtime_ns for p in others} == others
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert again == records  # the rerun arm reproduces its numbers; the stale partial output is gone


def test_an_arm_the_trainer_refuses_stops_the_study_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = _study(tmp_path, MICRO.replace("lr = 1e-2\nlora_rank = 2", "lr = 1e-2\nlora_rank = 0"))
    spec = load_study(study)
    with pytest.raises(StudyError, match=r"arm lora-lr0.01-lora_rank0-b0-seed0: finetune.lora_rank: must be"):
        plan(spec)
    assert not (tmp_path / "out").exists()


def test_a_failed_job_skips_its_dependents_and_not_the_others(tmp_path):
    """The pool goes on past a failure: what waits for it is reported as not run, an independent job runs."""

    def job(name: str, code: int, deps: list[str] | None = None) -> Job:
        argv = [sys.executable, "-c", f"print('{name}'); raise SystemExit({code})"]
        return Job(Command(name, argv, tmp_path / f"{name}.log"), done=lambda: False, deps=deps or [])

    todo = [job("counts", 2), job("arm", 0, ["counts"]), job("other", 0)]
    lines: list[str] = []
    failed = _run_jobs(Layout(tmp_path), todo, 2, None, 1, lines.append)
    assert {j.name: why for j, why in failed.items()} == {
        "counts": str(tmp_path / "counts.log"),
        "arm": "not run: counts failed",
    }
    assert (tmp_path / "other.log").read_text().splitlines()[-1] == "other"
    assert not (tmp_path / "arm.log").exists()
    assert any("counts: FAILED (exit 2): counts" in line for line in lines)


RETROFIT_GEOMETRY = """
[[geometry]]
name = "{mode}"
overrides = ["--model.flavor=debug_dense"]
retrofit = ["--retrofit.mode={mode}", "--retrofit.layers=2", "--model.memory_n_keys=16",
  "--model.memory_heads=2", "--model.memory_topk=4", "--model.memory_k_dim=16", "--model.memory_v_dim=32"]
heal_config = "train_configs/debug_heal.toml"
heal_overrides = ["--training.steps=2", "--training.global_batch_size=4", "--training.micro_batch_size=4"]
"""
RETROFIT = "".join(RETROFIT_GEOMETRY.replace("{mode}", mode) for mode in ("add", "replace"))


@pytest.mark.heavy
def test_micro_retrofit_study_shares_one_dense_base_and_heals_each_retrofit(tmp_path):
    """Two retrofit geometries of one dense recipe: one pretraining run, then per geometry an HF export, a
    heal, counts, base evaluation and arms that all read the retrofitted model (Goyal et al. 2026)."""
    text = MICRO.split("[[arm]]  # the background")[0].replace("[method.lora]", RETROFIT + "\n[method.lora]")
    study = _study(tmp_path, text.replace('\n[[arm]]\nmethod = "lora"\nlr = 1e-2\nlora_rank = 2\n', "\n"))
    spec = load_study(study)
    names = [j.name for j in plan(spec)]
    assert names[:4] == [
        "pretrain base add/b0",
        "export base add/b0",
        "heal base add/b0",
        "evaluate base add/b0",
    ]
    assert sum(n.startswith("pretrain") for n in names) == 1  # shared by both retrofits
    run = _run(study)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["geometry"], r["arm"] == "base") for r in records} == {
        (g, b) for g in ("add", "replace") for b in (True, False)
    }
    for geometry, mode in (("add", "add"), ("replace", "replace")):
        hf = out / geometry / "base-b0-files" / "hf"
        assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        arm = next((out / geometry / "arms" / "headline").glob("sparse-*")) / "config.json"
        cfg = json.loads(arm.read_text())["retrofit"]
        assert cfg == {"base": str(hf), "heal_objective": "lm", "layers": [2], "mode": mode}
    assert not (out / "replace" / "base-b0").exists()  # the dense base ran once, under the first geometry


def test_committed_results_skip_their_runs_and_what_only_they_needed(tmp_path):
    """With [study] results, a finished job's records go to a committed file (command, commit, machine);
    on a rerun, or a new machine where only those files exist, the arm is done and a heal or counts job
    whose every user is done does not run; an arm whose file is gone runs again, with what it waits for."""
    from titan_mem.study.spec import Arm

    layout = Layout(tmp_path / "out", committed=tmp_path / "committed")
    arm = Arm("full", "full_finetune", (("lr", 0.1),), seed=0)
    run = layout.arm_dir(arm)
    fake_run = (  # what a finished arm's run folder holds: its resolved config and an evaluation line
        "import json, pathlib; from titan_mem import config as c; "
        f"d = pathlib.Path({str(run)!r}); d.mkdir(parents=True); "
        "c.dump(c.parse_args(['train_configs/debug_full_finetune.toml']), d / 'config.json'); "
        "(d / 'metrics.jsonl').write_text(json.dumps({'step': 2, 'eval/x/nll': 1.0}))"
    )

    def job(name: str, deps: list[str], arm: Arm | None = None, done=lambda: False) -> Job:
        argv = [sys.executable, "-c", fake_run if arm else f"print('{name}')"]
        return Job(Command(name, argv, tmp_path / "logs" / f"{name}.log"), done=done, deps=deps, arm=arm)

    result = layout.arm_result(arm)
    assert result == tmp_path / "committed" / "default" / "headline" / "full-lr0.1-b0-seed0.json"
    result.parent.mkdir(parents=True)
    heal, counts = job("heal", []), job("counts", ["heal"])
    finished = job("arm", ["counts"], arm, done=lambda: result.is_file())
    result.write_text(json.dumps({"command": ["x"], "records": []}))
    assert _run_jobs(layout, [heal, counts, finished], 1, None, 1, lambda _: None) == {}
    assert not (tmp_path / "logs").exists()  # nothing ran: the arm is done, heal and counts serve only it
    result.unlink()
    assert _run_jobs(layout, [heal, counts, finished], 1, None, 1, lambda _: None) == {}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["arm.log", "counts.log", "heal.log"]
    doc = json.loads(result.read_text())
    assert (
        doc["command"] == finished.cmd.argv[1:] and len(doc["commit"]) >= 40 and doc["machine"]["cpus"] >= 1
    )
    assert [(r["arm"], r["step"], r["metrics"]) for r in doc["records"]] == [(arm.name, 2, {"x:nll": 1.0})]
