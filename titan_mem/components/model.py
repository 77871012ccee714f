"""Building the model a job runs: meta device -> converters (e.g. LoRA) -> FSDP2 + seeded init on the device.

Shared by the Trainer, background counting and (later) evaluation, so every one of them gets the same
model from the same config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from titan_mem.config import Config
from titan_mem.distributed import DistInfo
from titan_mem.errors import ConfigError
from titan_mem.hf.retrofit import model_args_for
from titan_mem.models.args import ModelArgs
from titan_mem.models.transformer import Transformer
from titan_mem.parallel.fsdp import mixed_precision_policy, parallelize_and_init
from titan_mem.parallel.memory_parallel import memory_parallel_mesh


def build_model(
    cfg: Config,
    dist_info: DistInfo,
    tokenizer: Any,
    converters: Sequence[Any] = (),
    fsdp_ignored: Callable[[nn.Module], set[str]] | None = None,
) -> tuple[Transformer, ModelArgs]:
    """The sharded, initialised model; `converters` change it on the meta device, `fsdp_ignored` names the
    parameters FSDP must leave whole on every rank."""
    model_args = model_args_for(cfg, tokenizer.n_words)
    if cfg.training.seq_len > model_args.max_seq_len:
        raise ConfigError(
            f"training.seq_len: {cfg.training.seq_len} exceeds the model's max_seq_len "
            f"{model_args.max_seq_len}"
        )
    with torch.device("meta"):
        model = Transformer(model_args)
    for converter in converters:
        converter.convert(model)
    mp = mixed_precision_policy(
        dist_info.device,
        cfg.training.mixed_precision_param,
        cfg.training.mixed_precision_reduce,
        on_cpu=cfg.training.cpu_mixed_precision,
    )
    memory_mesh = None
    if model_args.memory.layers and cfg.parallelism.memory_parallel_degree != 0:
        try:
            memory_mesh = memory_parallel_mesh(
                dist_info.device.type, dist_info.world_size, cfg.parallelism.memory_parallel_degree
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if model_args.v_dim % memory_mesh.size(1):
            raise ConfigError(
                f"parallelism.memory_parallel_degree: value dim {model_args.v_dim} is not divisible by "
                f"{memory_mesh.size(1)} memory-parallel ranks"
            )
    replicas = cfg.parallelism.data_parallel_replicate_degree
    fsdp_mesh = dist_info.mesh
    if replicas > 1:  # HSDP: shard within each group of world / replicas ranks, all-reduce across groups
        fsdp_mesh = init_device_mesh(
            dist_info.device.type,
            (replicas, dist_info.world_size // replicas),
            mesh_dim_names=("dp_replicate", "dp_shard"),
        )
    model = parallelize_and_init(
        model,
        fsdp_mesh,
        dist_info.device,
        seed=cfg.job.seed,
        mp_policy=mp,
        activation_checkpoint=cfg.training.activation_checkpoint,
        compile_blocks=cfg.training.compile,
        ignored_param_names=fsdp_ignored(model) if fsdp_ignored is not None else set(),
        memory_mesh=memory_mesh,
        memory_dtype=mp.param_dtype,
    )
    for layer in model.memory_layers().values():
        layer.value_table.backend = cfg.training.memory_kernel
    return model, model_args
