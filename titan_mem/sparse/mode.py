"""The sparse-memory-finetuning mode of the Trainer (Lin et al. 2025, sec. 3).

Per step: count the slots the *global* batch touched in each memory layer (padding excluded, all-reduced
over data-parallel ranks), score them against the background counts (`finetune.ranking`), keep the top
`finetune.top_t`, and update only those value rows. Everything else is frozen. The value tables stay out
of FSDP (plain tensors, identical on every rank) so their gradient can be row-sparse: the cost of a step
scales with the rows touched and selected, never with the n_slots x v_dim table.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from titan_mem.config import Config, ConfigError
from titan_mem.distributed import all_reduce_sum
from titan_mem.modes import FinetuneMode
from titan_mem.sparse.counts import SlotCounter, count_slots, load_background_counts
from titan_mem.sparse.row_optim import RowSparseAdamW, RowSparseSGD
from titan_mem.sparse.scores import select_slots


def _value_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """Value table per memory layer name (a shared pool appears under each layer that reads it)."""
    return {name: layer.value_table.weight for name, layer in model.memory_layers().items()}


def _rows_of_sparse_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense [len(rows), D] gradient of `rows` from a (possibly uncoalesced) sparse COO table gradient."""
    out = torch.zeros(rows.numel(), grad.shape[1], dtype=grad.dtype, device=grad.device)
    if grad._nnz() == 0 or rows.numel() == 0:
        return out
    grad = grad.coalesce()
    have = grad.indices()[0]
    pos = torch.searchsorted(have, rows).clamp(max=have.numel() - 1)
    hit = have[pos] == rows
    out[hit] = grad.values()[pos[hit]]
    return out


def gather_selected_rows(
    tables: dict[str, nn.Parameter], choose: Any
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]]]:
    """Per value table: the rows chosen by any layer reading it, with their data-parallel summed gradient.

    `choose(layer_name)` gives a layer's selected rows. A shared pool is one Parameter under several layer
    names whose `.grad` already sums every layer's contribution, so its gradient is read once, at the union
    of the layers' rows (reading it per layer would count a row picked by two layers twice). Returns
    `{first layer name of each table: (rows, grad_rows)}` and every layer's own selection (for the log).
    """
    by_table: dict[int, list[str]] = {}
    for name, table in tables.items():
        by_table.setdefault(id(table), []).append(name)
    staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    selected_ids: dict[str, list[int]] = {}
    for names in by_table.values():
        table = tables[names[0]]
        picks = []
        for name in names:
            rows = choose(name)
            selected_ids[name] = rows.tolist()
            picks.append(rows)
        rows = picks[0] if len(picks) == 1 else torch.cat(picks).unique()
        rows = rows.to(table.device)
        if table.grad is None:
            grad_rows = torch.zeros(rows.numel(), table.shape[1], device=table.device, dtype=table.dtype)
        else:
            grad_rows = _rows_of_sparse_grad(table.grad, rows.to(table.grad.device))
        all_reduce_sum(grad_rows)
        staged[names[0]] = (rows, grad_rows)
    return staged, selected_ids


class RowSparseOptimizer(torch.optim.Optimizer):
    """A torch Optimizer face (param_groups with lr, for the LR scheduler) over row-sparse updaters.

    `stage(name, rows, grad_rows)` queues the selected rows of one table; `step()` applies them.
    """

    def __init__(self, tables: dict[str, nn.Parameter], cfg):
        unique: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in tables.items():
            unique.setdefault(id(p), (name, p))
        params = [p for _, p in unique.values()]
        lr = cfg.lr if cfg.memory_lr is None else cfg.memory_lr  # the value rows' rate, as in pretraining
        super().__init__([{"params": params, "lr": lr, "name": "memory_values"}], {"lr": lr})
        self.table_of = {name: id(p) for name, p in tables.items()}
        self.updaters: dict[int, Any] = {}
        for key, (_, p) in unique.items():
            if cfg.name == "sgd":
                self.updaters[key] = RowSparseSGD(
                    p.data, lr=lr, momentum=cfg.momentum, weight_decay=cfg.memory_weight_decay
                )
            else:
                self.updaters[key] = RowSparseAdamW(
                    p.data,
                    lr=lr,
                    betas=tuple(cfg.betas),
                    eps=cfg.eps,
                    weight_decay=cfg.memory_weight_decay,
                )
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_update_norm = 0.0

    def stage(self, name: str, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Queue one table's update (a shared pool is staged once, see `gather_selected_rows`)."""
        key = self.table_of[name]
        if key in self.pending:
            raise RuntimeError(f"value table of '{name}' staged twice in one step")
        self.pending[key] = (rows, grad_rows)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch signature
        lr = self.param_groups[0]["lr"]
        sq = 0.0
        for key, (rows, grad_rows) in self.pending.items():
            updater = self.updaters[key]
            updater.set_lr(lr)
            before = updater.table[rows].clone()
            updater.step(rows, grad_rows)
            sq += float((updater.table[rows] - before).double().pow(2).sum())
        self.last_update_norm = sq**0.5
        self.pending = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


class _RowOptimizerState(Stateful):
    """Row-optimizer state is replicated and grows with the rows ever updated: stored as one blob."""

    def __init__(self, optimizer: RowSparseOptimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        torch.save({str(i): u.state_dict() for i, u in enumerate(self.optimizer.updaters.values())}, buf)
        return {"row_optimizer": buf.getvalue(), "param_groups_lr": self.optimizer.param_groups[0]["lr"]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        states = torch.load(io.BytesIO(sd["row_optimizer"]), weights_only=True)
        for i, u in enumerate(self.optimizer.updaters.values()):
            u.load_state_dict(states[str(i)])
        self.optimizer.param_groups[0]["lr"] = sd["param_groups_lr"]


class SparseFinetuneMode(FinetuneMode):
    name = "sparse_finetune"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        ft = cfg.finetune
        self.ranking, self.top_t = ft.ranking, ft.top_t
        counts = ft.background_counts
        if counts is None and cfg.checkpoint.initial_load_path:
            counts = str(Path(cfg.checkpoint.initial_load_path) / "background_counts.safetensors")
        if ft.ranking in ("tfidf", "kl") and counts is None:
            raise ConfigError(
                f"finetune.background_counts: ranking '{ft.ranking}' needs background counts "
                "(tools/background_counts.py), or set checkpoint.initial_load_path to a folder holding them"
            )
        self.counts_path = counts if ft.ranking in ("tfidf", "kl") else None
        self.background = None
        self.counter: SlotCounter | None = None
        self.step_log: dict[str, Any] = {}
        self.selection_log = Path(cfg.job.dump_folder) / "selected_slots.jsonl"

    def fsdp_ignored_param_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.endswith("values.weight")}

    def after_load(self, model: nn.Module) -> None:
        layers = model.memory_layers()
        if not layers:
            raise ConfigError(
                "training.mode=sparse_finetune: the model has no memory layer (model.memory_layers)"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.value_table.weight.requires_grad_(True)
            layer.record_indices = True
            layer.sparse_grad = True
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.eval()  # frozen statistics: nothing outside the selected rows may change
        self.n_slots = {name: layer.value_table.weight.shape[0] for name, layer in layers.items()}
        if self.counts_path is not None:
            try:
                base = self.cfg.checkpoint.initial_load_path
                check = base if (base and self.cfg.finetune.check_counts_checkpoint) else None
                self.background = load_background_counts(
                    self.counts_path, expect_layers=self.n_slots, expect_checkpoint=check
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.counter = SlotCounter(self.n_slots)

    def trainable_params(self, model: nn.Module) -> list[nn.Parameter]:
        return list({id(p): p for p in _value_tables(model).values()}.values())

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return RowSparseOptimizer(_value_tables(model), self.cfg.optimizer)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Stateful:
        return _RowOptimizerState(optimizer)

    def before_forward(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        self.counter.reset()

    def after_micro_batch(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["token_mask"]
        for name, layer in model.memory_layers().items():
            touched, counts = count_slots(layer.last_indices, mask, self.n_slots[name])
            self.counter.add(name, touched, counts)
            layer.last_indices = None

    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Select rows from the global counts, all-reduce only their gradients, clip, and stage them."""
        global_counts = self.counter.global_counts()
        tables = _value_tables(model)

        def choose(name: str) -> torch.Tensor:
            touched, counts = global_counts[name]
            bg = self.background.layer(name) if self.background is not None else None
            return select_slots(touched, counts, self.ranking, self.top_t, bg)

        staged, selected_ids = gather_selected_rows(tables, choose)
        for table in tables.values():
            table.grad = None
        sq = sum(float(g.double().pow(2).sum()) for _, g in staged.values())
        norm = torch.tensor(sq**0.5)
        if max_norm > 0 and float(norm) > max_norm:
            scale = max_norm / (float(norm) + 1e-6)
            staged = {k: (r, g * scale) for k, (r, g) in staged.items()}
        self._staged, self._selected_ids = staged, selected_ids
        touched = sum(int(global_counts[name][0].numel()) for name in tables)
        selected = sum(len(ids) for ids in selected_ids.values())
        self.step_log = {
            "slots_touched": touched,
            "slots_selected": selected,
            "frac_touched_kept": selected / max(1, touched),
        }
        return norm

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        for name, (rows, grad_rows) in self._staged.items():
            optimizer.stage(name, rows, grad_rows)
        return dict(self.step_log)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.step_log["update_norm"] = optimizer.last_update_norm
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.selection_log.parent.mkdir(parents=True, exist_ok=True)
            with self.selection_log.open("a") as f:
                record = {"step": self.current_step, **self.step_log, "selected": self._selected_ids}
                f.write(json.dumps(record) + "\n")

    def step_info(self) -> dict[str, Any]:
        return {"update_norm": self.step_log.get("update_norm", 0.0)}
