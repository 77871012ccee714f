"""Smoke run of a study's quick tier: the same code path as the study (facts, heal, counts, evaluations, every
arm's method), at smoke scale, from an empty output folder; then checks what it wrote and prints a JSON line.

    tools/get_model.sh smollm2-135m
    python tools/smoke_study.py studies/smollm2_triviaqa.toml [--jobs 1] [--keep]

Checks: every arm finished with its evaluation points, each holding the study's learning and forgetting
metrics as finite numbers; the base record holds them too; report.md was written. Exit 0 when all hold,
1 (naming the first failure) when one does not, 2 for a bad study file. Not part of the unit suite: on a
2-core CPU the SmolLM2 study's quick tier takes minutes (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from titan_mem.components.bench import machine_info
from titan_mem.study.results import read_results
from titan_mem.study.spec import StudyError, load_study

REPO = Path(__file__).resolve().parent.parent


def check(study: str, out: Path) -> list[str]:
    """What is wrong with the quick run's outputs (empty: nothing)."""
    spec = load_study(study, quick=True)
    results = out / "results.jsonl"
    if not results.is_file():
        return [f"{results}: not written"]
    records = read_results(results)
    problems = []
    wanted = [str(spec.learning), *(str(r) for r in spec.forgetting_refs("val"))]
    wanted = [w.replace("_val", "") for w in wanted]  # a forgetting template without {split} stays as is
    if not any(r["arm"] == "base" for r in records):
        problems.append("no base record")
    for arm in spec.arms:
        mine = [r for r in records if r["arm"] == arm.name and r.get("group") == arm.group]
        if not mine:
            problems.append(f"arm {arm.name}: no evaluation point")
    for r in records:
        for key in wanted:
            value = r["metrics"].get(key)
            if value is None or not math.isfinite(value):
                problems.append(f"{r['arm']} step {r['step']}: {key} = {value}")
    if not (out / "report.md").is_file():
        problems.append("report.md: not written")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="reuse the quick tier's earlier outputs")
    args = p.parse_args()
    try:
        spec = load_study(args.study, quick=True)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.keep and spec.out.exists():
        shutil.rmtree(spec.out)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "titan_mem.study", args.study, "--quick", "--jobs", str(args.jobs)]
    rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    seconds = time.perf_counter() - t0
    problems = [f"the study exited {rc}"] if rc else check(args.study, spec.out)
    doc = {"study": args.study, "tier": "quick", "seconds": round(seconds, 1), "ok": not problems,
           "problems": problems[:20], "machine": machine_info(), "command": " ".join(cmd)}  # fmt: skip
    print(json.dumps(doc))
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
