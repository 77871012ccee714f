"""The rules between keys: defaults that depend on other keys, and checks that make a run impossible
(each error names its key). A section's own checks are its `validate()`; a choice outside its `Literal`
is refused by `config_fields.check_choices` for every section at once."""

from __future__ import annotations

import dataclasses

from titan_mem.config.sections import Config
from titan_mem.config_fields import check_choices
from titan_mem.errors import ConfigError


def resolve_defaults(cfg: Config) -> None:
    """Fill the keys whose default depends on others: optimizer.name '' = sgd for sparse finetuning (Lin et
    al. 2025, sec. 5: SGD forgets less for sparse updates), adamw otherwise."""
    if not cfg.optimizer.name:
        cfg.optimizer.name = "sgd" if cfg.training.mode == "sparse_finetune" else "adamw"


def validate(cfg: Config) -> None:
    """Cross-field checks that make a run impossible; each error names its key. Reads only."""
    for section in dataclasses.fields(cfg):
        check_choices(getattr(cfg, section.name), section.name)
    if cfg.checkpoint.save_format == "sparse" and cfg.finetune.sparse_update == "masked_gradient":
        raise ConfigError(  # a patch holds the rows ever selected; momentum and decay move the others too
            "checkpoint.save_format: 'sparse' cannot hold finetune.sparse_update=masked_gradient (it moves "
            "rows never selected); use auto or full"
        )
    for key in ("mixed_precision_param", "mixed_precision_reduce"):
        if getattr(cfg.training, key) == "float16":  # fp16 gradients underflow without loss scaling
            raise ConfigError(
                f"training.{key}: float16 needs a gradient scaler, which we do not have; use bfloat16"
            )
    t = cfg.training
    for key in ("seq_len", "global_batch_size", "micro_batch_size", "steps"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"training.{key}: must be positive; got {getattr(t, key)}")
    if cfg.optimizer.lr < 0:
        raise ConfigError(f"optimizer.lr: must be >= 0; got {cfg.optimizer.lr}")
    if cfg.checkpoint.interval <= 0:
        raise ConfigError(f"checkpoint.interval: must be positive; got {cfg.checkpoint.interval}")
    if cfg.metrics.log_freq <= 0:
        raise ConfigError(f"metrics.log_freq: must be positive; got {cfg.metrics.log_freq}")
    if not 0.0 <= cfg.lr_scheduler.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio: must be in [0, 1]; got {cfg.lr_scheduler.decay_ratio}")
    if (degree := cfg.parallelism.data_parallel_shard_degree) != -1 and degree < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree: -1 or >= 1; got {degree}")
    if (replicas := cfg.parallelism.data_parallel_replicate_degree) < 1:
        raise ConfigError(f"parallelism.data_parallel_replicate_degree: >= 1; got {replicas}")
    if cfg.parallelism.memory_parallel_degree < -1:
        degree = cfg.parallelism.memory_parallel_degree
        raise ConfigError(f"parallelism.memory_parallel_degree: -1, 0 or >= 1; got {degree}")
    lazy_ok = cfg.training.mode in ("pretrain", "full_finetune") and cfg.optimizer.name == "adamw"
    if cfg.optimizer.memory_update == "lazy" and not (lazy_ok and cfg.parallelism.memory_parallel_degree):
        raise ConfigError(
            "optimizer.memory_update: 'lazy' needs optimizer.name=adamw, training.mode pretrain or "
            "full_finetune and parallelism.memory_parallel_degree != 0 (a row-sparse gradient); got "
            f"{cfg.optimizer.name}, {cfg.training.mode}, {cfg.parallelism.memory_parallel_degree}"
        )
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers; got {cfg.optimizer.betas}")
    for section in (cfg.tokenizer, cfg.data, cfg.finetune, cfg.eval, cfg.retrofit):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def shard_degree(cfg: Config, world_size: int) -> int:
    """Ranks one FSDP group shards the model over: world size / replicas, or a refusal naming the key."""
    replicas = cfg.parallelism.data_parallel_replicate_degree
    if world_size % replicas:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree: {replicas} does not divide world size {world_size}"
        )
    shard = world_size // replicas
    if cfg.parallelism.data_parallel_shard_degree not in (-1, shard):
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree: {cfg.parallelism.data_parallel_shard_degree} != world "
            f"size {world_size} / data_parallel_replicate_degree {replicas} = {shard}"
        )
    return shard


def validate_batch(cfg: Config, dp_world_size: int) -> int:
    """Return gradient-accumulation steps; refuse a global batch the ranks cannot split evenly."""
    t = cfg.training
    per_step = t.micro_batch_size * dp_world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} is not divisible by "
            f"micro_batch_size ({t.micro_batch_size}) x data-parallel ranks ({dp_world_size})"
        )
    return t.global_batch_size // per_step
