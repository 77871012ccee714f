"""Benchmark: how well background counts files separate slots for tf-idf selection (docs/benchmarks.md).

    python tools/bench_slot_selection.py COUNTS.safetensors [...] [--finetune-config FT.toml] [--steps 30]
                                         [--root outputs/bench_slot_selection] [--out FILE.json]

Per counts file: the share of all slots with idf exactly 0 (df = N) and never read (df = 0); then a real
sparse finetune of --steps steps (`python -m titan_mem.train FT.toml --finetune.background_counts=FILE
--finetune.counts_shape_tolerance=0`, one run folder per file under --root) and, from its
selected_slots.jsonl, the share of all selected rows with idf 0 and the mean overlap of the tf-idf top-t with
the tf top-t. Extra `--section.key=value` arguments go to every finetune run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.background_counts import idf_stats, selected_idf_zero
from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.sparse.counts import load_background_counts


def finetune(ft_config: str, counts: Path, run: Path, steps: int, extra: list[str]) -> None:
    """One sparse finetune over `counts`, any batch shape accepted (that is what is being compared)."""
    cmd = [sys.executable, "-m", "titan_mem.train", ft_config, f"--finetune.background_counts={counts}"]
    cmd += ["--finetune.counts_shape_tolerance=0", f"--job.dump_folder={run}", f"--training.steps={steps}"]
    cmd += ["--checkpoint.enable=false", *extra]
    if (run / "selected_slots.jsonl").exists():
        (run / "selected_slots.jsonl").unlink()  # the log appends
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"finetune with {counts} failed: {tail[0]}")


def measure(path: Path, run: Path, ft_tokens: int) -> dict:
    """One counts file's row of the table, from the file and the finetune run's selection log."""
    bg = load_background_counts(path)
    meta = bg.metadata
    records = [json.loads(x) for x in (run / "selected_slots.jsonl").read_text().splitlines() if x.strip()]
    mean = lambda key: sum(r[key] for r in records) / max(1, len(records))
    return {
        "file": str(path),
        "batch_size": meta.get("batch_size"),
        "seq_len": meta.get("seq_len"),
        "tokens_per_batch": meta.get("tokens_per_batch"),
        "x_finetune_tokens": meta["batch_size"] * meta["seq_len"] / ft_tokens,
        "n_batches": bg.n_batches,
        **{f"slots_{k}": v for k, v in idf_stats(bg).items()},
        "steps": len(records),
        "slots_touched_per_step": mean("slots_touched"),
        "selected_idf_zero": selected_idf_zero(bg, run / "selected_slots.jsonl"),
        "tfidf_tf_overlap": mean("tfidf_tf_overlap"),
    }


def run(argv: list[str]) -> list[dict]:
    from titan_mem.components.bench import machine_info, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", type=Path)
    parser.add_argument("--finetune-config", default="train_configs/debug_sparse_finetune.toml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--root", type=Path, default=Path("outputs/bench_slot_selection"))
    parser.add_argument("--out", type=Path)
    args, extra = parser.parse_known_args(argv)
    ft = config_mod.parse_args([args.finetune_config, *extra])
    ft_tokens = ft.training.global_batch_size * ft.training.seq_len
    rows = []
    for path in args.counts:
        run_dir = args.root / path.name.removesuffix(".safetensors")
        finetune(args.finetune_config, path, run_dir, args.steps, extra)
        rows.append(measure(path, run_dir, ft_tokens))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {
        "machine": machine_info(),
        "finetune_config": args.finetune_config,
        "finetune_batch": [ft.training.global_batch_size, ft.training.seq_len],
        "top_t": ft.finetune.top_t,
        "rows": rows,
    }
    write_report(report, args.out)
    return rows


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
