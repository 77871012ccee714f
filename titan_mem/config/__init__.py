"""The job configuration: `sections` (every key, its type, default and help), `rules` (defaults that
depend on other keys, checks across sections), `loader` (TOML + `--section.key=value` overrides, the
resolved `config.json`, `--help`). `python -m titan_mem.config CONFIG [overrides]` only validates."""

from __future__ import annotations

from titan_mem.config.loader import (
    apply_overrides,
    dump,
    help_text,
    load_run_config,
    main,
    parse_args,
    read_toml,
)
from titan_mem.config.rules import resolve_defaults, shard_degree, validate, validate_batch
from titan_mem.config.sections import (
    MODES,
    CheckpointConfig,
    Config,
    EvalConfig,
    FinetuneConfig,
    JobConfig,
    LRSchedulerConfig,
    MetricsConfig,
    Mode,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    RetrofitConfig,
    TrainingConfig,
)

__all__ = [
    "MODES",
    "CheckpointConfig",
    "Config",
    "EvalConfig",
    "FinetuneConfig",
    "JobConfig",
    "LRSchedulerConfig",
    "MetricsConfig",
    "Mode",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "RetrofitConfig",
    "TrainingConfig",
    "apply_overrides",
    "dump",
    "help_text",
    "load_run_config",
    "main",
    "parse_args",
    "read_toml",
    "resolve_defaults",
    "shard_degree",
    "validate",
    "validate_batch",
]
