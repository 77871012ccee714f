"""Sparse-finetuning checkpoints are knowledge patches on their base: small, resumable bit for bit on 1 and 2
ranks, equal to the whole finetuned model once applied, stackable and removable, refused on the wrong base.

Expected values come from DCP's own reader and the safetensors file read directly (conftest), not from the
module under test.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    REPO,
    error_line,
    launch,
    load_model_tensors,
    read_metrics,
    run_trainer,
    sparse_finetune_args,
)
from conftest import ok as _ok
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

VALUES = "layers.1.feed_forward.values.weight"
TOOL = str(REPO / "tools" / "convert_checkpoint.py")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k].float()), _bits(b[k].float())), k


def _finetune(base, run, *extra, nproc=1):
    _ok(run_trainer(sparse_finetune_args(base, run, *extra), nproc=nproc))
    return run / "checkpoints" / "step-4"


def _convert(*args):
    return launch([TOOL, *map(str, args)])


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    sparse = _finetune(pretrained, root / "sparse")
    full = _finetune(pretrained, root / "full", "--checkpoint.save_format=full")
    return {"root": root, "base": pretrained, "sparse": sparse, "full": full}


def test_sparse_checkpoint_holds_a_patch_not_the_model(runs):
    step = runs["sparse"]
    saved = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert not any(k.startswith(("model.", "optimizer.")) for k in saved)
    assert {"train_state.step", "lr_scheduler.last_epoch"} <= set(saved)
    with safe_open(str(step / "patch.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        rows = f.get_tensor(f"rows/{VALUES}")
    assert keys == {f"rows/{VALUES}", f"base/{VALUES}", f"finetuned/{VALUES}"}
    assert meta["base"] == str(runs["base"].resolve())
    # the union of the rows ever selected (selected_slots.jsonl), nothing else
    log = runs["sparse"].parents[1] / "selected_slots.jsonl"
    ever = set()
    for line in log.read_text().splitlines():
        ever |= set(json.loads(line)["selected"]["layers.1.feed_forward"])
    assert sorted(ever) == rows.tolist()
    size = sum(p.stat().st_size for p in step.iterdir())
    full_size = sum(p.stat().st_size for p in runs["full"].iterdir())
    assert size < full_size / 3, (size, full_size)


def test_base_plus_sparse_checkpoint_equals_the_full_finetuned_model(runs, tmp_path):
    want = load_model_tensors(runs["full"])  # saved whole by the same run with save_format=full
    assert_same_model(load_model_tensors(runs["sparse"]), want)
    out = tmp_path / "exported"
    _ok(_convert("export-model", runs["sparse"], out))
    assert_same_model(load_model_tensors(out), want)
    # the export records its lineage: the patch comes off again, giving the base bit for bit
    removed = tmp_path / "removed"
    _ok(_convert("apply-delta", out, runs["sparse"] / "patch.safetensors", removed, "--remove"))
    assert_same_model(load_model_tensors(removed), load_model_tensors(runs["base"]))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sparse_checkpoint_resume_is_exact(runs, tmp_path, nproc):
    extra = ["--optimizer.name=sgd", "--optimizer.momentum=0.9", "--optimizer.lr=1"]
    extra += [f"--training.micro_batch_size={4 // nproc}"]
    straight = _finetune(runs["base"], tmp_path / "straight", *extra, nproc=nproc)
    split = tmp_path / "split"
    args = sparse_finetune_args(runs["base"], split, *extra)
    _ok(run_trainer([*args, "--training.steps=2"], nproc=nproc))
    assert (split / "checkpoints" / "step-2" / "patch.safetensors").is_file()
    proc = _ok(run_trainer([*args, "--training.steps=4"], nproc=nproc))
    assert "resumed from" in proc.stdout
    a = {r["step"]: r["loss"] for r in read_metrics(straight.parents[1])}
    b = {r["step"]: r["loss"] for r in read_metrics(split)}
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    assert_same_model(load_model_tensors(straight), load_model_tensors(split / "checkpoints" / "step-4"))


def test_resume_on_another_base_is_refused(runs, tmp_path):
    run = tmp_path / "r"
    _ok(run_trainer([*sparse_finetune_args(runs["base"], run), "--training.steps=2"]))
    other = tmp_path / "other"
    _ok(_convert("export-model", runs["full"], other))  # same shapes, other values
    proc = run_trainer(
        [
            *sparse_finetune_args(other, run),
            f"--finetune.background_counts={runs['base'] / 'background_counts.safetensors'}",
            "--finetune.check_counts_checkpoint=false",
        ]
    )
    error_line(proc, "refusing to resume", last=True)


def test_patches_stack_and_come_off_in_sequence(runs, tmp_path):
    base, p1 = runs["base"], runs["sparse"]
    # P2 is trained on base + P1 (a sparse checkpoint as initial_load_path resolves to base + patch)
    p2 = _finetune(
        p1,
        tmp_path / "p2",
        f"--finetune.background_counts={base / 'background_counts.safetensors'}",
        "--finetune.check_counts_checkpoint=false",
        "--data.seed=7",
    )
    c1, c2 = tmp_path / "c1", tmp_path / "c2"
    _ok(_convert("apply-delta", base, p1 / "patch.safetensors", c1))
    _ok(_convert("apply-delta", c1, p2 / "patch.safetensors", c2))
    assert_same_model(load_model_tensors(c2), load_model_tensors(p2))
    # P2 needs P1 under it
    proc = _convert("apply-delta", base, p2 / "patch.safetensors", tmp_path / "x")
    assert proc.returncode == 2 and "not applied here" in proc.stderr, proc.stderr
    # off again in reverse order, back to the base bit for bit
    d1, d0 = tmp_path / "d1", tmp_path / "d0"
    _ok(_convert("apply-delta", c2, p2 / "patch.safetensors", d1, "--remove"))
    assert_same_model(load_model_tensors(d1), load_model_tensors(c1))
    _ok(_convert("apply-delta", d1, p1 / "patch.safetensors", d0, "--remove"))
    assert_same_model(load_model_tensors(d0), load_model_tensors(base))


def test_conflicting_patch_is_refused(runs, tmp_path):
    """Two patches from one base that changed the same rows: the second does not apply over the first."""
    p3 = _finetune(runs["base"], tmp_path / "p3", "--optimizer.lr=1")  # same data: same first selection
    c1 = tmp_path / "c1"
    _ok(_convert("apply-delta", runs["base"], runs["sparse"] / "patch.safetensors", c1))
    proc = _convert("apply-delta", c1, p3 / "patch.safetensors", tmp_path / "x")
    error_line(proc, VALUES, "refusing", last=True)
    assert not (tmp_path / "x").exists()


def test_a_sparse_runs_patch_applies_to_the_bases_transformers_export(runs, tmp_path):
    """The user story outside titan_mem: ship the base once (to-hf), ship facts as the run's patch. The patch
    applied in transformers gives the logits of the sparse checkpoint's own export (which records the patch,
    so applying it there again is refused)."""
    import transformers

    _ok(_convert("to-hf", runs["base"], tmp_path / "base_hf"))
    _ok(_convert("to-hf", runs["sparse"], tmp_path / "sparse_hf"))
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(tmp_path / "base_hf", trust_remote_code=True).eval()
    finetuned = load(tmp_path / "sparse_hf", trust_remote_code=True).eval()
    patch = str(runs["sparse"] / "patch.safetensors")
    assert base.apply_knowledge_patch(patch) > 0
    tokens = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(tokens).logits, finetuned(tokens).logits)
    with pytest.raises(ValueError, match="already applied"):
        finetuned.apply_knowledge_patch(patch)
