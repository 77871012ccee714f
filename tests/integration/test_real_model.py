"""SmolLM2-135M-Instruct, a real pretrained model, through titan_mem: its tokenizer against llama.cpp's, and
the retrofit path (add at block 15 -> heal -> counts -> sparse finetuning -> evaluate -> export) on a few
steps. The model comes from `tools/get_model.sh smollm2-135m` (CI fetches it); without it these tests skip,
except where TITAN_MEM_REQUIRE_REAL_MODEL=1 (.ci/run) makes a missing model a failure."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import REAL_MODEL, REPO, ok, read_metrics, run_tool, run_trainer

PINNED = REPO / "tests" / "data" / "smollm2_llamacpp_tokens.json"
GGUF = REAL_MODEL.with_suffix(".gguf")

if not (REAL_MODEL / "model.safetensors").is_file():
    if os.environ.get("TITAN_MEM_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError(f"{REAL_MODEL} is missing: run tools/get_model.sh smollm2-135m")
    pytest.skip(f"{REAL_MODEL} not present (tools/get_model.sh smollm2-135m)", allow_module_level=True)

# Facts no pretrained model knows (made up here), in the QA files' record format.
FACTS = [
    ("Which river runs through the town of Velmora?", "the Quillan"),
    ("Who founded the Orrisk Glassworks?", "Dagny Tolv"),
    ("What is the capital of the island of Marrowen?", "Skelport"),
    ("Which instrument did Ansel Pricor play?", "the hurdy-gurdy"),
]
PROSE = (REPO / "README.md").read_text().split("\n\n")  # real English text, shipped with the repo
# The shipped configs (train_configs/smollm2_*.toml) at the model's own geometry, with a smaller memory
# (1K slots) and a few steps of tiny batches.
SMALL = [
    f"--retrofit.base={REAL_MODEL}",
    f"--tokenizer.name={REAL_MODEL}",
    "--model.max_seq_len=256",
    "--model.memory_n_keys=32",
    "--model.memory_heads=2",
    "--model.memory_topk=8",
    "--model.memory_k_dim=64",
    "--metrics.log_freq=1",
    "--data.num_workers=0",
]


def test_the_tokenizer_gives_llama_cpps_ids():
    """The tokenizer from-gguf writes (the GGUF's `smollm` pre-tokenizer: digits split one by one) gives the
    ids llama.cpp gives on 300 strings of numbers, code, unicode and whitespace (pinned by
    tools/pin_llamacpp_tokens.py from the same file)."""
    from titan_mem.data.hf_tokenizer import HFTokenizer

    pinned = json.loads(PINNED.read_text())
    if GGUF.is_file():
        assert hashlib.sha256(GGUF.read_bytes()).hexdigest() == pinned["gguf_sha256"]
    tok = HFTokenizer(str(REAL_MODEL))
    wrong = [(text, ids) for text, ids in pinned["cases"] if tok.encode(text) != ids]
    assert not wrong, f"{len(wrong)} of {len(pinned['cases'])} differ, e.g. {wrong[0]}"
    assert tok.prefix_ids() == [] and tok.chat_template and "<|im_start|>" in tok.chat_template


def _taught_nll(checkpoint: Path, facts: Path, out: Path) -> float:
    """The facts' answer NLL (nats per answer token, zero-shot `Question: q\nAnswer:` as they were taught)."""
    args = [
        "--checkpoint",
        str(checkpoint),
        "--tasks",
        f"triviaqa:{facts}",
        "--shots",
        "0",
        "--out",
        str(out),
    ]
    ok(run_tool("evaluate.py", [*args, "--no-progress"]))
    (nll,) = [r["value"] for r in json.loads(out.read_text())["results"] if r["metric"] == "answer_nll"]
    return nll


@pytest.mark.heavy
def test_the_real_model_retrofits_heals_counts_learns_and_exports(tmp_path):
    """import (the fetched folder) -> add retrofit at block 15 -> LM heal -> background counts -> sparse
    finetuning on 4 made-up facts (tf-idf top-64 rows, SGD) -> evaluate -> export -> evaluate it.

    SGD at lr 200: on this model the loss falls by lr * |g|^2 per step (|g| ~ 0.057 on the 64 rows), so the
    paper's lr 2 moves it ~0.05 nats in 8 steps and lr 200 ~3 (docs/benchmarks.md, "SmolLM2-135M")."""
    prose, facts = tmp_path / "prose.jsonl", tmp_path / "facts.jsonl"
    prose.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROSE if len(p) > 200))
    facts.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in FACTS))
    heal, sparse = tmp_path / "heal", tmp_path / "sparse"
    shape = ["--training.seq_len=64", "--training.global_batch_size=2", "--training.micro_batch_size=2"]
    heal_args = ["train_configs/smollm2_heal.toml", *SMALL, f"--data.source={prose}", *shape]
    ok(
        run_trainer(
            [*heal_args, f"--job.dump_folder={heal}", "--training.steps=2", "--checkpoint.interval=2"]
        )
    )
    first = read_metrics(heal)[0]["loss"]
    assert 2.0 < first < 7.0, first  # the pretrained model's on README.md (a wrong load: ~ln 49152 = 10.8)
    base = heal / "checkpoints" / "step-2"
    counts = ["--checkpoint", str(base), "--batches", "3", "--batch-size", "2", "--seq-len", "32"]
    ok(
        run_tool(
            "background_counts.py",
            ["train_configs/smollm2_heal.toml", *SMALL, f"--data.source={prose}", *counts],
        )
    )
    assert (base / "background_counts.safetensors").is_file()

    before = _taught_nll(base, facts, tmp_path / "before.json")
    ok(
        run_trainer(
            [
                "train_configs/smollm2_sparse_finetune.toml",
                *SMALL,
                f"--job.dump_folder={sparse}",
                f"--checkpoint.initial_load_path={base}",
                f"--data.source={facts}",
                "--training.seq_len=32",
                "--training.global_batch_size=4",
                "--training.micro_batch_size=4",
                "--training.steps=8",
                "--data.bucket_batches=1",
                "--finetune.top_t=64",
                "--optimizer.lr=200",
                "--checkpoint.interval=8",
            ]
        )
    )
    step = sparse / "checkpoints" / "step-8"
    after = _taught_nll(step, facts, tmp_path / "after.json")
    assert before - after >= 1.0, (before, after)

    hf = tmp_path / "hf"
    ok(run_tool("convert_checkpoint.py", ["to-hf", str(step), str(hf)]))
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert _taught_nll(hf, facts, tmp_path / "exported.json") == pytest.approx(after, abs=1e-4)
