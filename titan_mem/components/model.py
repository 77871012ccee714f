"""Building the model a job runs: meta device -> converters (e.g. LoRA) -> FSDP2 + seeded init on the device.

Shared by the Trainer, background counting and (later) evaluation, so every one of them gets the same
model from the same config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from titan_mem.config import Config, ConfigError
from titan_mem.data.tokenizer import padded_vocab_size
from titan_mem.distributed import DistInfo
from titan_mem.models.args import ModelArgs, build_model_args
from titan_mem.models.transformer import Transformer
from titan_mem.parallel.fsdp import mixed_precision_policy, parallelize_and_init


def build_model(
    cfg: Config,
    dist_info: DistInfo,
    tokenizer: Any,
    converters: Sequence[Any] = (),
    fsdp_ignored: Callable[[nn.Module], set[str]] | None = None,
) -> tuple[Transformer, ModelArgs]:
    """The sharded, initialised model; `converters` change it on the meta device, `fsdp_ignored` names the
    parameters FSDP must leave whole on every rank."""
    model_args = build_model_args(cfg.model, padded_vocab_size(tokenizer.n_words))
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
        dist_info.device, cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce
    )
    model = parallelize_and_init(
        model,
        dist_info.mesh,
        dist_info.device,
        seed=cfg.job.seed,
        mp_policy=mp,
        activation_checkpoint=cfg.training.activation_checkpoint == "full",
        compile_blocks=cfg.training.compile,
        ignored_param_names=fsdp_ignored(model) if fsdp_ignored is not None else set(),
    )
    return model, model_args
