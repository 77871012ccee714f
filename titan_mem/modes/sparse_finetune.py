"""Sparse memory finetuning (Lin et al. 2025): only memory value rows train. Per step the slot selector
ranks the rows the batch touched against the background counts (tf-idf, tf, KL, all) and the row-sparse
optimizer updates the top-t of them (SGD in the papers); a checkpoint is a knowledge patch on the base.

A step, read top to bottom: train.py (forward) -> `SlotSelector.before_backward` counts the slots read and,
after the last micro-batch's forward, scores them and keeps the top-t (sparse/select.py) -> train.py
(backward: gradient rows of those only on the last micro-batch) -> `SlotSelector.prepare_gradients` sums
the kept rows' gradients over ranks (through parallel/value_grads.py) -> `RowSparseOptimizer.step` updates
those rows only (sparse/update.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_mem.checkpoint.content import SparseContent
from titan_mem.config import Config
from titan_mem.errors import ConfigError
from titan_mem.modes.base import StepHook, TrainingMode, freeze_batchnorm
from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.counts import COUNTS_FILE, load_background_counts
from titan_mem.sparse.masked_optim import MASKED_UPDATERS
from titan_mem.sparse.select import NEEDS_BACKGROUND, SlotSelector
from titan_mem.sparse.update import RowSparseOptimizer


def sparse_counts_path(cfg: Config) -> str | None:
    """The background counts a sparse finetune reads (None when its ranking needs none)."""
    ft = cfg.finetune
    if ft.ranking not in NEEDS_BACKGROUND and ft.top_t_rule != "poisson":
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


class SparseFinetune(TrainingMode):
    name = "sparse_finetune"

    @classmethod
    def check(cls, cfg: Config) -> None:
        sparse_counts_path(cfg)  # refuse a missing counts setting before anything is built

    def fsdp_ignored(self, model: nn.Module) -> set[str]:
        """The value tables stay whole on every rank, outside FSDP, so selection and update cost follow the
        rows touched, never the table."""
        ids = {id(p) for p in model.value_tables().values()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        if not model.memory_layers():
            raise ConfigError(
                "training.mode=sparse_finetune: the model has no memory layer (model.memory_layers)"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        tables = list({id(p): p for p in model.value_tables().values()}.values())
        for table in tables:
            table.requires_grad_(True)
        model.set_sparse_value_grad(True)
        freeze_batchnorm(model)  # nothing outside the selected rows may change
        return tables

    def build_optimizer(
        self, model: nn.Module, params: list[nn.Parameter], value_grads: dict[str, ValueTableGrad]
    ) -> RowSparseOptimizer:
        # finetune.sparse_update=masked_gradient: the papers' ablation, every row moves (masked_optim)
        masked = MASKED_UPDATERS if self.cfg.finetune.sparse_update == "masked_gradient" else None
        return RowSparseOptimizer(model.value_tables(), self.cfg.optimizer, value_grads, masked)

    def build_checkpoint(self, model: nn.Module, optimizer: RowSparseOptimizer) -> SparseContent:
        # masked_gradient moves rows never selected (momentum, weight decay): no patch can hold that
        cfg = self.cfg
        save_model = cfg.checkpoint.save_format == "full" or cfg.finetune.sparse_update == "masked_gradient"
        run = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        return SparseContent(model, optimizer, cfg.checkpoint.initial_load_path, run, save_model)

    def build_hooks(
        self,
        model: nn.Module,
        optimizer: RowSparseOptimizer,
        device: torch.device,
        value_grads: dict[str, ValueTableGrad],
    ) -> list[StepHook]:
        cfg, counts, background = self.cfg, sparse_counts_path(self.cfg), None
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
        return [SlotSelector(model, optimizer, cfg.finetune, background, log, value_grads, device)]
