"""Background slot counts for sparse memory finetuning (Lin et al. 2025, sec. 3: df over N batches).

    python tools/background_counts.py CONFIG (--finetune-config FT.toml | --batch-size B --seq-len L)
                                      [--checkpoint STEP_DIR] [--batches 1000] [--out FILE]
                                      [--section.key=value ...]
    NGPU=8: torchrun --nproc_per_node=8 tools/background_counts.py CONFIG ...

CONFIG supplies the model, tokenizer and the (pretraining) data that is counted. A background batch has the
finetuning batch's shape: `--finetune-config` takes it from that config (training.global_batch_size x
training.seq_len) together with the default checkpoint (its checkpoint.initial_load_path) and output
(<checkpoint>/background_counts.safetensors, where sparse finetuning looks); `--batch-size/--seq-len` give it
explicitly. Pretraining-sized batches saturate idf at 0 and are not a default (README, "Sparse memory
finetuning"). The counting itself is `titan_mem.background_counts.count_background`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.background_counts import count_background, default_checkpoint
from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.errors import ConfigError
from titan_mem.sparse.counts import COUNTS_FILE

NO_SHAPE = (
    "background batch shape: pass --finetune-config FINETUNE.toml (or --batch-size B --seq-len L); counts "
    "over pretraining-sized batches saturate idf at 0 (README.md, 'Sparse memory finetuning')"
)


def run(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description="Background memory-slot counts", add_help=True)
    parser.add_argument("config", help="model, tokenizer and the (pretraining) data to count")
    parser.add_argument(
        "--finetune-config",
        help="the finetuning config whose batch shape (training.global_batch_size x training.seq_len), "
        "checkpoint.initial_load_path and counts location to use",
    )
    parser.add_argument("--batch-size", type=int, help="sequences per background batch (with --seq-len)")
    parser.add_argument("--seq-len", type=int, help="tokens per background sequence (with --batch-size)")
    parser.add_argument("--checkpoint", help="checkpoint step folder to load the model from")
    parser.add_argument("--batches", type=int, default=1000, help="N background batches (paper: 1000)")
    parser.add_argument("--out", help=f"output file (default <checkpoint>/{COUNTS_FILE})")
    args, overrides = parser.parse_known_args(argv)
    explicit = (args.batch_size, args.seq_len)
    if args.finetune_config and any(v is not None for v in explicit):
        raise ConfigError("--finetune-config gives the batch shape: drop --batch-size/--seq-len")
    if args.finetune_config is None and None in explicit:
        if any(v is not None for v in explicit):
            raise ConfigError("--batch-size and --seq-len: give both (the finetuning batch's shape)")
        raise ConfigError(NO_SHAPE)
    cfg = config_mod.parse_args([args.config, *overrides])
    checkpoint = args.checkpoint
    if args.finetune_config:
        ft = config_mod.parse_args([args.finetune_config])
        batch_size, seq_len = ft.training.global_batch_size, ft.training.seq_len
        checkpoint = checkpoint or ft.checkpoint.initial_load_path
    else:
        batch_size, seq_len = explicit
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
    return count_background(cfg, checkpoint, args.batches, batch_size, seq_len, args.out)


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
