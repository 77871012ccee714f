"""tools/gpu_check.sh is tested where it is written: its dry run (GPU_CHECK_DRY=1) runs every step on CPU at
toy sizes, and the step runner's timeout kills a hung step without losing the summary."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

STEPS = [
    "wheels",
    "imports",
    "kernel_tests",
    "lookup_1b_shapes",
    "sparse_finetune_e2e",
    "pretrain_1b_eager",
    "pretrain_1b_compiled",
    "memory_vs_dense_twin",
    "peers_memory_layer",
    "end",
]


def _runner():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.heavy
def test_dry_run_runs_every_step_and_keeps_a_summary_line_for_each(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "GPU_CHECK_TMP": str(tmp_path / "tmp")}
    env["PY"] = sys.executable
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    lines = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in lines}
    assert [r["step"] for r in lines] == STEPS, proc.stderr[-2000:]
    failed = {r["step"]: r for r in lines if r.get("rc") not in (0, None)}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-2000:])
    assert by_step["imports"]["titan_mem.data.loader"] == "ok"
    assert by_step["kernel_tests"]["tests"].get("passed", 0) > 0
    assert {(r["backend"], r["dtype"]) for r in by_step["lookup_1b_shapes"]["lookup"]} == {
        (b, d) for b in ("torch", "triton") for d in ("float32", "bfloat16")
    }
    sparse = by_step["sparse_finetune_e2e"]
    assert sparse["ok"] is True
    rows = sparse["checks"]["sparse_only_selected_rows"]
    assert rows["value_rows_changed"] > 0 and rows["rows_changed_outside_selection"] == 0
    eager, compiled = by_step["pretrain_1b_eager"], by_step["pretrain_1b_compiled"]
    assert eager["steps_logged"] == compiled["steps_logged"] == 3
    assert eager["estimated_total_gib"] > 0 and eager["peak_mem_gib"] > 0
    assert all(abs(a - b) < 1e-3 for a, b in zip(eager["losses"], compiled["losses"], strict=True))
    assert len(by_step["memory_vs_dense_twin"]["pair"]) == 2
    peers = by_step["peers_memory_layer"]
    assert peers["pkm"] and all(r["ratio_forward"] > 0 for r in peers["pkm"])
    assert peers["sparse_update"] and all(r["ratio_vs_masked"] > 0 for r in peers["sparse_update"])
    # What comes back from the device: at most 8 files, all small; nothing bulky was written there.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files), files
    assert (out / "gpu_check.log").stat().st_size > 0


def test_a_hung_step_is_killed_at_its_timeout_with_its_children(tmp_path):
    gpu_check = _runner()
    marker = tmp_path / "child_alive"
    # A shell whose child outlives a plain kill of the shell: the whole process group must go.
    step = gpu_check.Step("hang", ["bash", "-c", f"(sleep 30; touch {marker}) & sleep 30"], 1)
    t0 = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        rc, timed_out = gpu_check._run(step, 1.0, log)
    assert (rc, timed_out) == (124, True)
    assert time.monotonic() - t0 < 15
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "" and not marker.exists()
