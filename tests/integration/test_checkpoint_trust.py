"""Checkpoints never run code on load (checkpoint/safe_dcp.py): crafted `.metadata`, a crafted non-tensor
value and an old-style pickled per-rank state are each refused with one line, and the payload never runs."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import TINY, error_line, run_trainer
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan_mem.checkpoint.safe_dcp import SafeFileSystemReader, decode_state, encode_state


class Payload:
    """Pickles as a call to os.makedirs(marker): harmless, and visible if it ever runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _copy_run(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained.parent.parent, run)  # pretrained = <run>/checkpoints/step-3
    return run, run / "checkpoints" / "step-3"


def _resume(run):
    return run_trainer([*TINY, f"--job.dump_folder={run}", "--training.steps=4"])


def _rewrite(step_dir, tmp_path, change):
    """Consolidate a DCP folder, change its nested state, write it back with DCP (which pickles values)."""
    pt = tmp_path / "state.pt"
    dcp_to_torch_save(str(step_dir), str(pt))
    state = torch.load(pt, weights_only=True)
    change(state)
    shutil.rmtree(step_dir)
    dcp.save(state, checkpoint_id=str(step_dir), no_dist=True)


def _refused(proc, needle: str, marker) -> None:
    error_line(proc, needle, last=True, code=None)
    assert not marker.exists(), "the payload ran"


def test_metadata_with_a_payload_is_refused_before_anything_runs(pretrained, tmp_path):
    run, step = _copy_run(pretrained, tmp_path)
    marker = tmp_path / "pwned_metadata"
    metadata = SafeFileSystemReader(str(step)).read_metadata()
    metadata.planner_data = {"x": Payload(str(marker))}  # a real index with one poisoned field
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _refused(_resume(run), "not loaded, it could run code (refusing global os.makedirs)", marker)


def test_a_non_tensor_value_with_a_payload_is_refused(pretrained, tmp_path):
    run, step = _copy_run(pretrained, tmp_path)
    marker = tmp_path / "pwned_value"
    _rewrite(step, tmp_path, lambda s: s["lr_scheduler"].__setitem__("last_epoch", Payload(str(marker))))
    _refused(_resume(run), "'lr_scheduler.last_epoch': not loaded, not plain data", marker)


def test_a_pickled_rank_state_is_never_unpickled(pretrained, tmp_path):
    """What used to pass `weights_only` (bytes) and ran on resume: a pickle inside the per-rank bytes."""
    run, step = _copy_run(pretrained, tmp_path)
    marker = tmp_path / "pwned_rank_state"
    poisoned = pickle.dumps(Payload(str(marker)))
    _rewrite(step, tmp_path, lambda s: s["rank_state"].__setitem__("rank0", poisoned))
    _refused(_resume(run), "rank_state.rank0: not titan_mem's JSON per-rank state", marker)


def test_rank_state_json_keeps_types():
    state = {
        "loader": {"n": 3, "f": 0.5, "none": None, "ok": True, "t": (1, "a"), "by_int": {0: "w0", 1: "w1"}},
        "rng": torch.get_rng_state(),
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "raw": b"\x00\xff",
        "empty": torch.empty(0, 3),
    }
    back = decode_state(encode_state(state), "x")
    assert back["loader"] == state["loader"] and back["raw"] == state["raw"]
    for key in ("rng", "bf16", "empty"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    with pytest.raises(TypeError, match="per-rank state .x: set has no JSON form"):
        encode_state({"x": {1, 2}})
