"""Checks that need no process group, run before any worker starts.

`run_train.sh` calls `python -m titan_mem.preflight --world-size N CONFIG [overrides]` before torchrun, so a
bad config or a missing file gives one `error:` line and exit code 2 instead of one traceback per rank and
torchrun's failure report. The Trainer runs the same checks, so a direct `torchrun -m titan_mem.train`
launch refuses the same things.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.checkpoint import CheckpointError, check_resume_world_size, resume_path, step_dirs
from titan_mem.checkpoint.dcp_index import check_data_files, read_train_state
from titan_mem.config import Config
from titan_mem.data.sources import build_source
from titan_mem.data.streams import choose_layout
from titan_mem.errors import ConfigError
from titan_mem.modes import TrainingMode, build_mode, sparse_counts_path


def resume_checkpoint_exists(cfg: Config) -> bool:
    """Whether this run folder already holds a complete checkpoint (then initial_load_path is not read)."""
    return bool(step_dirs(Path(cfg.job.dump_folder) / cfg.checkpoint.folder))


def _check_resume_world_size(cfg: Config, world_size: int) -> None:
    """A finetuning resume must keep the data-parallel degree (its loader position is per rank): read it
    from the checkpoint the run would resume from, without a process group."""
    if not cfg.checkpoint.enable:
        return
    path = resume_path(Path(cfg.job.dump_folder) / cfg.checkpoint.folder, cfg.checkpoint.load_step)
    if path is None:
        return
    try:
        check_data_files(path)  # a truncated or missing shard, named before any worker starts
        saved = read_train_state(path).get("dp_world_size")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if saved is not None:
        check_resume_world_size(path, int(saved), world_size, cfg.data.regime)


def check_launch(cfg: Config, world_size: int) -> tuple[int, TrainingMode]:
    """Refuse what cannot run on `world_size` ranks; returns the gradient-accumulation steps and the mode
    (built here because a mode refuses what it cannot run; the Trainer uses this one)."""
    config_mod.shard_degree(cfg, world_size)
    mp_degree = cfg.parallelism.memory_parallel_degree
    if mp_degree > 0 and world_size % mp_degree:
        raise ConfigError(
            f"parallelism.memory_parallel_degree: {mp_degree} does not divide the world size {world_size}"
        )
    grad_accum = config_mod.validate_batch(cfg, world_size)
    _check_resume_world_size(cfg, world_size)
    if cfg.checkpoint.initial_load_path and not resume_checkpoint_exists(cfg):
        path = Path(cfg.checkpoint.initial_load_path)
        if not (path / ".metadata").is_file():
            raise ConfigError(f"checkpoint.initial_load_path: {path}: no DCP checkpoint there (no .metadata)")
    if cfg.data.regime == "pretrain":
        try:  # checks local paths; a hub name is read later
            choose_layout(cfg.data.streams, cfg.training.global_batch_size, 0, world_size)
            build_source(cfg.data)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    mode = build_mode(cfg)
    counts = sparse_counts_path(cfg) if cfg.training.mode == "sparse_finetune" else None
    if counts and not Path(counts).is_file():
        raise ConfigError(
            f"finetune.background_counts: {counts}: file not found (tools/background_counts.py)"
        )
    return grad_accum, mode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    world_size = 1
    if argv and argv[0].startswith("--world-size"):
        flag = argv.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (argv.pop(0) if argv else "")
        if not value.isdigit() or int(value) < 1:
            print(f"error: --world-size: expected a positive integer; got '{value}'", file=sys.stderr)
            return 2
        world_size = int(value)
    try:
        check_launch(config_mod.parse_args(argv), world_size)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
