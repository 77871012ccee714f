"""The study's subprocess entry points for its base stages (the arms are plain `titan_mem.train` runs):

    python -m titan_mem.study.worker counts --base STEP --finetune-config FT.toml --batches N --out F [--k=v]
    python -m titan_mem.study.worker eval   --base STEP --finetune-config FT.toml --tasks T --limit N
                                            --out F [--data-dir D] [--k=v]

`counts` counts the base's pretraining data (its run's config.json) in finetune-shaped batches;
`eval` scores the base with the finetuning config's data section (the same synthetic world and taught
split the arms' in-loop evaluation reads). Overrides apply to the finetuning config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.distributed import exit_process
from titan_mem.eval.runner import evaluate_checkpoint, load_checkpoint_config
from titan_mem.eval.tasks import parse_task_list
from titan_mem.sparse.background import count_background
from titan_mem.train import run_cli


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="titan_mem study stage")
    parser.add_argument("stage", choices=("counts", "eval"))
    parser.add_argument("--base", required=True, help="the base checkpoint step folder")
    parser.add_argument("--finetune-config", required=True, help="the study's finetuning config")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--batches", type=int, default=1000, help="counts: background batches")
    parser.add_argument("--tasks", help="eval: comma-separated tasks")
    parser.add_argument("--limit", type=int, help="eval: examples per task")
    parser.add_argument("--data-dir", help="eval: local evaluation data folder")
    args, overrides = parser.parse_known_args(argv)
    base = Path(args.base)
    ft = config_mod.parse_args([args.finetune_config, *overrides])
    if args.stage == "counts":
        cfg = load_checkpoint_config(base)
        batch, seq_len = ft.training.global_batch_size, ft.training.seq_len
        count_background(cfg, base, args.batches, batch, seq_len, args.out)
        return
    evaluate_checkpoint(
        base,
        parse_task_list(args.tasks or ""),
        limit=args.limit,
        data_dir=args.data_dir,
        config=args.finetune_config,
        overrides=[*overrides, "--training.mode=full_finetune"],  # score the base model as it is
        batch_size=ft.eval.batch_size,
        out=args.out,
        progress=False,
    )


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
