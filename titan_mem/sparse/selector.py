"""The slot selector of sparse memory finetuning (Lin et al. 2025, sec. 3): a step hook that turns the value
tables' gradients into gradients of the selected rows only.

Per step: count the slots the *global* batch read in each memory layer (padding excluded, summed over
data-parallel ranks), score them against the background counts (`finetune.ranking`), keep the top
`finetune.top_t` (every touched slot under ranking 'all'), and replace each table's gradient by a sparse
gradient holding exactly those rows, summed over ranks. Only those rows' gradients cross the network, and the
optimizer then updates only them (unless `finetune.sparse_update=masked_gradient`, an ablation). Per step
it logs how many slots were touched and selected, the fraction of selected rows whose idf is 0 (a saturated
background: DESIGN.md, "Slot selection") and the overlap of the tf-idf and tf top-t.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from titan_mem.distributed import all_reduce_sum
from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.counts import BackgroundCounts, SlotCounter
from titan_mem.sparse.scores import select_slots


def rows_of_sparse_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
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


def selected_row_gradients(
    tables: dict[str, nn.Parameter], choose: Any, value_grads: dict[str, ValueTableGrad]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]]]:
    """Per value table: the rows chosen by any layer reading it, with their gradient summed over ranks by
    the table's path (`value_grads`: every rank for a whole table, the replicas for a column shard).

    `choose(layer_name)` gives a layer's selected rows. A shared pool is one Parameter under several layer
    names whose `.grad` already sums every layer's contribution, so its gradient is read once, at the union
    of the layers' rows (reading it per layer would count a row picked by two layers twice). Returns
    `{first layer name of each table: (rows, grad_rows)}` and every layer's own selection (for the log).
    """
    paths = {id(v.table): v for v in value_grads.values()}
    by_table: dict[int, list[str]] = {}
    for name, table in tables.items():
        by_table.setdefault(id(table), []).append(name)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
            grad_rows = rows_of_sparse_grad(table.grad, rows.to(table.grad.device))
        out[names[0]] = (rows, paths[id(table)].sum_selected_rows(grad_rows))
    return out, selected_ids


class SlotSelector:
    """Step hook: count slots per micro-batch, then keep only the top-t rows' gradients before clipping."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        finetune: Any,
        background: BackgroundCounts | None,
        log_path: Path,
        value_grads: dict[str, ValueTableGrad],
        device: torch.device | None = None,
    ):
        """`finetune`: the [finetune] section (ranking, top_t, top_t_rule, top_t_mass, top_t_alpha);
        `value_grads`: each table's gradient path (`parallel.value_grads`)."""
        self.ranking, self.top_t, self.background = finetune.ranking, finetune.top_t, background
        self.rule = {"rule": finetune.top_t_rule, "mass": finetune.top_t_mass, "alpha": finetune.top_t_alpha}
        self.optimizer = optimizer  # reports the norm of the update it applied
        self.tables = model.value_tables()
        self.value_grads = value_grads
        self.n_slots = {name: t.shape[0] for name, t in self.tables.items()}
        self.counter = SlotCounter(self.n_slots, device)
        self.log_path = log_path
        self.tokens = 0
        self._record: dict[str, Any] = {}

    reads_slots = True

    def on_micro_batch(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]
    ) -> None:
        mask = batch["token_mask"]
        self.tokens += int(mask.sum())
        self.counter.add_slots(slots, mask)

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        """Select rows from the global counts; each table's gradient becomes its selected rows, summed over
        ranks (a sparse COO tensor with exactly those rows, zeros included, so the optimizer updates them)."""
        global_counts = self.counter.global_counts()

        def choose(name: str) -> torch.Tensor:
            touched, counts = global_counts[name]
            return select_slots(touched, counts, self.ranking, self.top_t, self._bg(name), **self.rule)

        staged, selected_ids = selected_row_gradients(self.tables, choose, self.value_grads)
        for name, (rows, grad_rows) in staged.items():
            table = self.tables[name]
            table.grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0), grad_rows, tuple(table.shape), is_coalesced=True, check_invariants=False
            )
        touched = sum(int(global_counts[n][0].numel()) for n in self.tables)
        selected = sum(len(ids) for ids in selected_ids.values())
        info: dict[str, Any] = {
            "slots_touched": touched,
            "slots_selected": selected,
            "frac_touched_kept": selected / max(1, touched),
            **self._diagnostics(global_counts, selected_ids),
        }
        tokens = int(all_reduce_sum(torch.tensor([self.tokens], dtype=torch.float64)).item())
        if self.background is not None and self.background.metadata.get("tokens_per_batch"):
            info["tokens_vs_background"] = tokens / float(self.background.metadata["tokens_per_batch"])
        self._record = {**info, "selected": selected_ids}
        self.counter.reset()
        self.tokens = 0
        return info

    def _bg(self, name: str):
        return self.background.layer(name) if self.background is not None else None

    def _diagnostics(self, global_counts, selected_ids: dict[str, list[int]]) -> dict[str, float]:
        """Selected rows with idf = 0 (df = N: read by every background batch), and |top_t(tfidf) ∩
        top_t(tf)| / top_t: both show whether the background separates the slots a batch reads."""
        if self.background is None:
            return {}
        idf0, n_sel, overlap, n_top = 0, 0, 0, 0
        for name, ids in selected_ids.items():
            bg = self._bg(name)
            rows = torch.tensor(ids, dtype=torch.int64)
            n_sel += rows.numel()
            idf0 += int((bg.df.index_select(0, rows) >= bg.n_batches).sum()) if rows.numel() else 0
            touched, counts = global_counts[name]
            by_tf = select_slots(touched, counts, "tf", self.top_t)
            by_tfidf = select_slots(touched, counts, "tfidf", self.top_t, bg)
            overlap += int(torch.isin(by_tfidf, by_tf).sum())
            n_top += max(1, by_tf.numel())
        return {"selected_idf0_frac": idf0 / max(1, n_sel), "tfidf_tf_overlap": overlap / max(1, n_top)}

    def after_step(self, step: int) -> dict[str, Any]:
        """Append the step's selection to `selected_slots.jsonl` (rank 0); log the update norm."""
        info = {"update_norm": self.optimizer.last_update_norm}
        if dist.is_initialized() and dist.get_rank() != 0:
            return info
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, **self._record, **info}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return info
