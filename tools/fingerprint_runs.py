"""Fingerprint fixed-seed runs of every training mode, to show that a refactor changed no result.

Runs (debug model, CPU, one thread): 20 pretraining steps, 5 background-count batches on that checkpoint,
then 10 steps each of sparse, full and LoRA finetuning from it. Writes JSON: each run's loss per step and a
sha256 per checkpoint file, where a file's hash covers only what does not change from one identical run
to the next: a DCP shard's bytes (its `.metadata` holds a random save id), a safetensors file's tensors
(the counts file holds its creation time), and no `base_lineage.json` (file times).

    git worktree add /tmp/old OLD_COMMIT
    python tools/fingerprint_runs.py --repo /tmp/old --out outputs/fingerprint/before.json   # the old code
    python tools/fingerprint_runs.py --out outputs/fingerprint/after.json                    # this checkout
    python tools/fingerprint_runs.py --compare outputs/fingerprint/before.json outputs/fingerprint/after.json

Both runs must use the same `--work` folder (the runs record absolute paths). `--compare` exits 1 on any
difference and names it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
FINETUNES = ("sparse", "full", "lora")


def _run(repo: Path, args: list[str], log: Path) -> None:
    """`python ARGS` with `repo`'s code (its folder first on the path, whatever is installed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    with log.open("w") as f:
        cmd = [sys.executable, *args]
        subprocess.run(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def _file_hash(path: Path) -> str | None:
    if path.name in (".metadata", "base_lineage.json"):
        return None
    if path.suffix == ".safetensors":
        h = hashlib.sha256()
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                h.update(key.encode())
                h.update(f.get_tensor(key).numpy().tobytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(run: Path) -> dict:
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[str(rec["step"])] = rec["loss"]
    files = {}
    for path in sorted((run / "checkpoints").rglob("*")):
        if path.is_file() and (digest := _file_hash(path)) is not None:
            files[str(path.relative_to(run))] = digest
    return {"losses": losses, "files": files}


def fingerprint(repo: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pre, log = work / "pre", ["--metrics.log_freq=1"]
    train = ["-m", "titan_mem.train"]
    _run(repo, [*train, "train_configs/debug_model.toml", "--training.steps=20", f"--job.dump_folder={pre}",
                "--checkpoint.interval=20", *log], work / "pre.log")  # fmt: skip
    base = pre / "checkpoints" / "step-20"
    counts = ["tools/background_counts.py", "train_configs/debug_model.toml", "--batches", "5"]
    finetune_shape = ["--finetune-config", "train_configs/debug_sparse_finetune.toml"]
    _run(repo, [*counts, *finetune_shape, "--checkpoint", str(base)], work / "counts.log")
    out = {"pre": _fingerprint(pre)}
    for mode in FINETUNES:
        run = work / mode
        _run(repo, [*train, f"train_configs/debug_{mode}_finetune.toml", "--training.steps=10",
                    f"--job.dump_folder={run}", f"--checkpoint.initial_load_path={base}",
                    "--checkpoint.interval=10", *log], work / f"{mode}.log")  # fmt: skip
        out[mode] = _fingerprint(run)
    return out


def compare(a: dict, b: dict) -> list[str]:
    """Every difference, one line each."""
    diffs = []
    for run in sorted(set(a) | set(b)):
        for part in ("losses", "files"):
            pa, pb = a.get(run, {}).get(part, {}), b.get(run, {}).get(part, {})
            for key in sorted(set(pa) | set(pb)):
                if pa.get(key) != pb.get(key):
                    diffs.append(f"{run} {part} {key}: {pa.get(key)} != {pb.get(key)}")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the fingerprint JSON here")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "fingerprint" / "runs")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        diffs = compare(*(json.loads(f.read_text()) for f in args.compare))
        print("\n".join(diffs) if diffs else "identical: every loss and every checkpoint tensor")
        return 1 if diffs else 0
    if args.out is None:
        p.error("--out or --compare")
    result = fingerprint(args.repo.resolve(), args.work.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    n = sum(len(r["files"]) for r in result.values())
    print(f"wrote {args.out}: {len(result)} runs, {n} checkpoint files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
