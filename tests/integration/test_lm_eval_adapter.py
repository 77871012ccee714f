"""The lm-evaluation-harness adapter: lm-eval's numbers on the local HellaSwag and GSM8K files equal the
project's own scorers on the same examples (same EvalModel underneath, so any gap is a prompt, target,
delimiter or metric mismatch), and the command-line wrapper runs offline and writes results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
GSM8K_LIMIT = 8
BATCH = 16
HELLASWAG_TASK, GSM8K_TASK = "test_titan_hellaswag", "test_titan_gsm8k_nll"


@pytest.fixture(scope="module")
def checkpoint(pretrained) -> Path:
    """The suite's shared tiny 3-step pretraining checkpoint."""
    return pretrained


@pytest.fixture(scope="module")
def cli_run(checkpoint, tmp_path_factory):
    """The command-line wrapper on the shipped YAMLs (their default ../shared/data paths, from the repository
    root), started at once so its ~20 s of lm-eval indexing its 14k built-in tasks overlaps the in-process
    tests; yields (process, its folder: log.txt, out/)."""
    tmp = tmp_path_factory.mktemp("lm_eval_cli")
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp / "hf_cache"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "titan_mem.eval.lm_eval_cli",
        "--model", "titan_mem",
        "--model_args", f"checkpoint={checkpoint},progress=false,training.device=cpu",
        "--tasks", "titan_mem_hellaswag_local,titan_mem_gsm8k_nll_local",
        "--limit", str(GSM8K_LIMIT), "--batch_size", str(BATCH), "--output_path", str(tmp / "out"),
    ]  # fmt: skip
    with (tmp / "log.txt").open("w") as log:  # a file, not a pipe nobody reads until the end
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def own(checkpoint, cli_run):
    """The project's scorers on the checkpoint: its EvalModel and {task: TaskOutput}. Loading makes a
    one-rank process group in this pytest process; it is destroyed after the module so later tests see
    none."""
    from titan_mem.distributed import shutdown
    from titan_mem.eval.runner import load_eval_model
    from titan_mem.eval.tasks import TaskContext, build_tasks

    lm, _ = load_eval_model(checkpoint, batch_size=BATCH)
    tasks = build_tasks(["hellaswag", "gsm8k"], TaskContext(data_dir=SHARED_DATA, limit=GSM8K_LIMIT))
    yield lm, {t.name: t.evaluate(lm) for t in tasks}
    shutdown()


def metric(output, name: str) -> float:
    (value,) = [m["value"] for m in output.metrics if m["metric"] == name]
    return value


@pytest.fixture
def harness(checkpoint, own, tmp_path, monkeypatch):
    """lm-eval's results (with per-document samples) on temporary task YAMLs pointing at ../shared/data."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    from titan_mem.eval import lm_eval_adapter  # noqa: F401  (registers "titan_mem")
    from titan_mem.eval.lm_eval_tasks import GSM8K_NLL, HELLASWAG, local_task_yaml

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import, maybe before this test
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    cache = tmp_path / "hf_cache"
    for task, name, data in [
        (HELLASWAG, HELLASWAG_TASK, "hellaswag_4.jsonl"),
        (GSM8K_NLL, GSM8K_TASK, "gsm8k_test.jsonl"),
    ]:
        (tasks / f"{name}.yaml").write_text(local_task_yaml(task, name, SHARED_DATA / data, cache))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # the 14k built-ins take 20 s
    return lm_eval.simple_evaluate(
        model="titan_mem",  # through the registry and create_from_arg_string
        model_args=f"checkpoint={checkpoint},batch_size={BATCH},progress=false",
        tasks=[HELLASWAG_TASK, GSM8K_TASK],
        limit=GSM8K_LIMIT,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )


def test_harness_equals_project_scorers(harness, own):
    _, outputs = own
    results, samples = harness["results"], harness["samples"]

    hs, mine = results[HELLASWAG_TASK], outputs["hellaswag"]
    assert hs["sample_len"] == 4 == len(mine.predictions)
    assert hs["acc,none"] == metric(mine, "acc")
    assert hs["acc_norm,none"] == metric(mine, "acc_norm")
    # per choice, not only the argmax: 16 log-likelihoods of " " + ending after the query
    by_doc = sorted(samples[HELLASWAG_TASK], key=lambda s: s["doc_id"])
    for sample, pred in zip(by_doc, mine.predictions, strict=True):
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert got == pytest.approx(pred["loglikelihoods"], rel=1e-6, abs=0)
        assert sample["arguments"][0][1].startswith(" ") and sample["arguments"][0][0] == pred["prompt"]

    gsm, mine = results[GSM8K_TASK], outputs["gsm8k"]
    assert gsm["sample_len"] == GSM8K_LIMIT == len(mine.predictions)
    assert math.isfinite(gsm["nll,none"]) and gsm["nll,none"] > 0
    assert gsm["nll,none"] == pytest.approx(metric(mine, "nll"), rel=1e-6, abs=0)
    assert gsm["ppl,none"] == pytest.approx(metric(mine, "ppl"), rel=1e-6, abs=0)
    by_doc = sorted(samples[GSM8K_TASK], key=lambda s: s["doc_id"])
    for sample, pred in zip(by_doc, mine.predictions, strict=True):
        context, target = sample["arguments"][0]
        assert (context, target) == (pred["prompt"], pred["references"][0])
        logprob, n_tokens = sample["nll"]
        assert n_tokens == pred["tokens"] > 0
        assert -logprob / n_tokens == pytest.approx(pred["nll"], rel=1e-6, abs=0)
    # token-weighted, not the mean of per-document NLLs (they differ when lengths differ)
    per_doc_mean = sum(p["nll"] for p in mine.predictions) / GSM8K_LIMIT
    assert len({p["tokens"] for p in mine.predictions}) > 1
    assert gsm["nll,none"] != pytest.approx(per_doc_mean, rel=1e-9, abs=0)


def test_generation_rolling_and_refusals(own):
    from titan_mem.eval.lm import EvalModel
    from titan_mem.eval.lm_eval_adapter import TitanMemLM

    lm, _ = own
    adapter = TitanMemLM(lm=lm, max_gen_toks=6)
    prompts = ["Question: Who wrote Hamlet?\nAnswer:", "The capital of France is"]
    reqs = [
        SimpleNamespace(args=(prompts[0], {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})),
        SimpleNamespace(args=(prompts[1], {"until": ".", "temperature": 0.0})),
    ]
    got = adapter.generate_until(reqs)
    assert got[0] == lm.generate_until(prompts[:1], until=["\n"], max_new_tokens=5)[0]
    assert got[1] == lm.generate_until(prompts[1:], until=["."], max_new_tokens=6)[0]
    # a budget past the model's positions is cut to max_seq_len - 1 (EvalModel refuses more); a short
    # window over the same model keeps this cheap
    short = EvalModel(lm.model, lm.tokenizer, max_seq_len=12)
    (long,) = TitanMemLM(lm=short).generate_until([SimpleNamespace(args=(prompts[1], {"max_gen_toks": 100}))])
    assert long == short.generate_until(prompts[1:], until=[], max_new_tokens=11)[0]
    assert adapter.loglikelihood_rolling([SimpleNamespace(args=(prompts[1],))]) == [
        lm.loglikelihood_rolling(prompts[1:])[0].logprob
    ]
    (ll,) = adapter.loglikelihood([SimpleNamespace(args=("", prompts[1]))])  # empty context: BOS only
    assert ll[0] < 0 and ll.n_tokens == len(lm.tokenizer.encode(prompts[1]))
    for kwargs in ({"do_sample": True}, {"temperature": 0.7}, {"num_beams": 4}, {"repetition_penalty": 1.3}):
        with pytest.raises(ValueError, match="greedily|unsupported"):
            adapter.generate_until([SimpleNamespace(args=(prompts[0], kwargs))])
    with pytest.raises(ValueError, match="checkpoint="):
        TitanMemLM()
    with pytest.raises(TypeError, match="section.key"):
        TitanMemLM(lm=lm, **{"bogus": 1})


def test_command_line_writes_results(cli_run, own):
    proc, folder = cli_run
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, (folder / "log.txt").read_text()[-5000:]
    (path,) = (folder / "out").rglob("results_*.json")
    results = json.loads(path.read_text())["results"]
    _, outputs = own
    hellaswag = results["titan_mem_hellaswag_local"]
    assert (hellaswag["acc,none"], hellaswag["acc_norm,none"]) == (
        metric(outputs["hellaswag"], "acc"),
        metric(outputs["hellaswag"], "acc_norm"),
    )
    nll = results["titan_mem_gsm8k_nll_local"]["nll,none"]
    assert nll == pytest.approx(metric(outputs["gsm8k"], "nll"), rel=1e-6, abs=0)


def test_registering_titan_mem_keeps_the_harness_models_and_declares_the_plugin():
    """lm-eval 0.4.13 imports its own models only while its registry is empty: our registration must not
    hide `hf` / `vllm`. The `lm_eval.models` entry point (lm-eval's plugin mechanism) names the adapter."""
    code = (
        "import titan_mem.eval.lm_eval_adapter\n"
        "from importlib.metadata import entry_points\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(sorted(model_registry.keys()))\n"
        "print(get_model('titan_mem').__name__)\n"
        "print([e.load().__name__ for e in entry_points(group='lm_eval.models') if e.name == 'titan_mem'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    keys, registered, plugin = out.stdout.strip().splitlines()[-3:]
    assert {"'hf'", "'vllm'", "'titan_mem'"} <= {k.strip() for k in keys.strip("[]").split(",")}
    assert registered == "TitanMemLM" and plugin == "['TitanMemLM']"
