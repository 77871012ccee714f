"""The four training modes, assembled from their parts (see `titan_mem.modes`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_mem.checkpoint.content import FullContent, SparseContent
from titan_mem.components.optim import build_optimizer
from titan_mem.config import MODES, Config, ConfigError
from titan_mem.hf.distill import FFNDistillation
from titan_mem.hf.retrofit import resolve_base
from titan_mem.modes.base import (
    LazyValueRows,
    LoRAConverter,
    ModelConverter,
    OnlyNamed,
    StepHook,
    SumRowsReadOverReplicas,
    TrainablePolicy,
    TrainingMode,
    freeze_batchnorm,
)
from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.counts import load_background_counts
from titan_mem.sparse.optimizer import RowSparseOptimizer
from titan_mem.sparse.selector import SlotSelector

COUNTS_FILE = "background_counts.safetensors"


class OnlyMemoryLayers(TrainablePolicy):
    """Healing (Goyal et al. 2026, sec. 3.3 stage 2): every memory-layer parameter trains (queries, keys,
    values, Memory+ projections, a retrofit's output gate), every other one stays as loaded."""

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        layers = model.memory_layers()
        if not layers:
            raise ConfigError("training.mode=heal: the model has no memory layer (retrofit.layers)")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            for p in layer.parameters():
                p.requires_grad_(True)
            layer.value_table.weight.requires_grad_(True)  # a shared pool is registered by the Transformer
        return [p for p in model.parameters() if p.requires_grad]


class OnlyValueTables(TrainablePolicy):
    """Sparse finetuning: only the memory value tables train, kept whole on every rank (outside FSDP) with a
    row-sparse gradient, so selection and update cost follow the rows touched, never the table."""

    def fsdp_ignored(self, model: nn.Module) -> set[str]:
        ids = {id(p) for p in model.value_tables().values()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        layers = model.memory_layers()
        if not layers:
            raise ConfigError(
                "training.mode=sparse_finetune: the model has no memory layer (model.memory_layers)"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.value_table.weight.requires_grad_(True)
            layer.sparse_grad = True
        freeze_batchnorm(model)  # nothing outside the selected rows may change
        return list({id(p): p for p in model.value_tables().values()}.values())


def sparse_counts_path(cfg: Config) -> str | None:
    """The background counts a sparse finetune reads (None when its ranking needs none)."""
    ft = cfg.finetune
    if ft.ranking not in ("tfidf", "kl") and ft.top_t_rule != "poisson":
        return None
    counts = ft.background_counts
    if counts is None and cfg.checkpoint.initial_load_path:
        counts = str(Path(cfg.checkpoint.initial_load_path) / COUNTS_FILE)
    if counts is None:
        raise ConfigError(
            f"finetune.background_counts: ranking '{ft.ranking}' / top_t_rule '{ft.top_t_rule}' needs "
            "background counts "
            "(tools/background_counts.py), or set checkpoint.initial_load_path to a folder holding them"
        )
    return counts


def _slot_selector(
    cfg: Config,
    model: nn.Module,
    optimizer: RowSparseOptimizer,
    device: torch.device,
    value_grads: dict[str, ValueTableGrad],
) -> SlotSelector:
    counts, background = sparse_counts_path(cfg), None
    if counts is not None:
        base = cfg.checkpoint.initial_load_path
        try:
            background = load_background_counts(
                counts,
                expect_layers={n: t.shape[0] for n, t in model.value_tables().items()},
                expect_checkpoint=base if (base and cfg.finetune.check_counts_checkpoint) else None,
                expect_batch=(cfg.training.global_batch_size, cfg.training.seq_len),
                shape_tolerance=cfg.finetune.counts_shape_tolerance,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    log = Path(cfg.job.dump_folder) / "selected_slots.jsonl"
    return SlotSelector(model, optimizer, cfg.finetune, background, log, value_grads, device)


def model_converters(cfg: Config) -> list[ModelConverter]:
    """What the mode changes in the model's structure (LoRA adapters): a checkpoint of the run loads only
    into a model converted the same way, e.g. for evaluation."""
    if cfg.training.mode == "lora_finetune":
        ft = cfg.finetune
        return [LoRAConverter(ft.lora_targets, ft.lora_rank, ft.lora_alpha)]
    return []


def _check_distill(cfg: Config) -> None:
    """What a distillation heal cannot run with: its memory-layer hooks fire once per forward, so neither a
    recomputing backward (activation checkpointing) nor a compiled block (untested) takes part."""
    if cfg.training.activation_checkpoint != "none":
        raise ConfigError(
            "training.activation_checkpoint: retrofit.heal_objective=distill keeps only the memory layers' "
            f"activations and needs none; got {cfg.training.activation_checkpoint}"
        )
    if cfg.training.compile:
        raise ConfigError("training.compile: not supported with retrofit.heal_objective=distill")


def build_mode(cfg: Config) -> TrainingMode:
    """The mode `training.mode` names; refuses what it cannot run (a finetune without its base)."""
    name = cfg.training.mode
    if name not in MODES:
        raise ConfigError(f"training.mode: expected one of {', '.join(MODES)}; got {name!r}")
    if cfg.retrofit.heal_objective != "lm" and name != "heal":
        raise ConfigError(
            f"retrofit.heal_objective: {cfg.retrofit.heal_objective} is a healing objective "
            f"(training.mode=heal); got training.mode={name}"
        )
    # a retrofit's HF weights can start any mode but sparse finetuning, whose patches need a base checkpoint
    from_hf = cfg.retrofit.base and name != "sparse_finetune"
    if name != "pretrain" and not (cfg.checkpoint.initial_load_path or from_hf):
        raise ConfigError(
            f"checkpoint.initial_load_path: {name} needs the pretrained (or healed) checkpoint to start from"
        )

    def dense_optimizer(
        model: nn.Module, params: list[nn.Parameter], value_grads: dict[str, ValueTableGrad]
    ) -> torch.optim.Optimizer:
        return build_optimizer(model, cfg.optimizer, params)

    if name == "sparse_finetune":
        sparse_counts_path(cfg)  # refuse a missing counts setting before anything is built
        # masked_gradient moves rows never selected (momentum, weight decay): no patch can hold that
        save_model = cfg.checkpoint.save_format == "full" or cfg.finetune.sparse_update == "masked_gradient"
        run = Path(cfg.job.dump_folder) / cfg.checkpoint.folder

        def sparse_checkpoint(model: nn.Module, optimizer: RowSparseOptimizer) -> SparseContent:
            return SparseContent(model, optimizer, cfg.checkpoint.initial_load_path, run, save_model)

        def hooks(
            model: nn.Module, optimizer: RowSparseOptimizer, device: torch.device, value_grads: dict
        ) -> list[StepHook]:
            return [_slot_selector(cfg, model, optimizer, device, value_grads)]

        return TrainingMode(
            name=name,
            policy=OnlyValueTables(),
            build_optimizer=lambda model, params, value_grads: RowSparseOptimizer(
                model.value_tables(), cfg.optimizer, value_grads, cfg.finetune.sparse_update
            ),
            build_checkpoint=sparse_checkpoint,
            build_hooks=hooks,
        )
    if cfg.checkpoint.save_format == "sparse":
        raise ConfigError(f"checkpoint.save_format: 'sparse' needs training.mode=sparse_finetune; got {name}")
    if name == "lora_finetune":
        (lora,) = model_converters(cfg)
        return TrainingMode(
            name=name,
            policy=OnlyNamed(lora.new_tensor_names),
            build_optimizer=dense_optimizer,
            build_checkpoint=FullContent,
            converters=[lora],
        )
    if name == "heal":
        mode = TrainingMode(
            name=name,
            policy=OnlyMemoryLayers(),
            build_optimizer=dense_optimizer,
            build_checkpoint=FullContent,
        )
        if cfg.retrofit.heal_objective == "distill":
            _check_distill(cfg)
            mode.build_objective = lambda model, device: FFNDistillation.from_retrofit(
                model, resolve_base(cfg.retrofit.base), device
            )
        return mode
    if cfg.optimizer.memory_update == "lazy":  # config.validate allows it for pretrain and full_finetune
        return TrainingMode(
            name=name,
            policy=LazyValueRows(),
            build_optimizer=dense_optimizer,
            build_checkpoint=FullContent,
            build_hooks=lambda model, optimizer, device, value_grads: [SumRowsReadOverReplicas(value_grads)],
        )
    return TrainingMode(
        name=name, policy=TrainablePolicy(), build_optimizer=dense_optimizer, build_checkpoint=FullContent
    )
