"""The slot selector of sparse memory finetuning (Lin et al. 2025, sec. 3): a step hook that turns the value
tables' gradients into gradients of the selected rows only.

Per step: count the slots the *global* batch read in each memory layer (padding excluded, summed over
data-parallel ranks), score them against the background counts (`finetune.ranking`), keep the top
`finetune.top_t` (every touched slot under ranking 'all'), and replace each table's gradient by a sparse
gradient holding exactly those rows, summed over ranks. Only those rows' gradients cross the network, and the
optimizer then updates only them (unless `finetune.sparse_update=masked_gradient`, an ablation). Per step
it logs how many slots were touched and selected, the fraction of selected rows whose idf is 0 (a saturated
background: docs/design.md, "Slot selection") and the overlap of the tf-idf and tf top-t.

Slot scores (`slot_scores`, `select_slots`): which touched memory rows a batch may update.

Everything here works on the sparse view of one layer's batch counts, `touched` (sorted unique slot ids,
K of them) and `counts` (accesses per touched slot), so a step costs O(K log K), never O(n_slots). The
background `df` vector is only ever indexed at `touched`; its one dense reduction (the KL normaliser) is
computed once, when the `SlotBackground` is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn as nn

from titan_mem.distributed import all_reduce_sum
from titan_mem.errors import ConfigError
from titan_mem.kernels import coalesced, restrict_row_grads
from titan_mem.parallel.value_grads import ValueTableGrad
from titan_mem.sparse.counts import BackgroundCounts, SlotBackground, SlotCounter

Ranking = Literal["tfidf", "tf", "kl", "all"]  # finetune.ranking
RANKINGS: tuple[str, ...] = get_args(Ranking)
# The rankings that score a slot against the background counts (the rest need none).
NEEDS_BACKGROUND = ("tfidf", "kl")
# How many rows a batch may update: a fixed t, or an input-dependent count capped at t (`adaptive_keep`).
TopTRule = Literal["fixed", "mass", "poisson"]  # finetune.top_t_rule
TOP_T_RULES: tuple[str, ...] = get_args(TopTRule)
# Goyal et al. 2026, sec. 3.5: the eps inside the KL log. It keeps log finite for p -> 0; it is far below
# any p_batch (>= 1/C) or p_bg (>= 1/(df.sum() + n_slots)) a real run produces, so it never reorders slots.
KL_EPS = 1e-10


def _check_ranking(ranking: str, background: SlotBackground | None) -> None:
    if ranking not in RANKINGS:
        raise ConfigError(f"finetune.ranking: unknown ranking {ranking!r}, expected one of {RANKINGS}")
    if background is None and ranking in NEEDS_BACKGROUND:
        raise ConfigError(
            f"finetune.ranking={ranking!r} needs background counts (df, N), but none were given"
        )


def _check_sparse(touched: torch.Tensor, counts: torch.Tensor) -> None:
    if touched.dim() != 1 or counts.shape != touched.shape:
        raise ValueError(
            f"slot scores: touched and counts must be 1-D of equal length, got {tuple(touched.shape)} "
            f"and {tuple(counts.shape)}"
        )


def slot_scores(
    touched: torch.Tensor, counts: torch.Tensor, ranking: str, background: SlotBackground | None = None
) -> torch.Tensor:
    """Float64 score per touched slot (same order as `touched`); higher means "update this row first".

    tf    = c / C,  C = sum(c)                                     (Lin et al. 2025; Goyal et al. 2026 3.5)
    tfidf = tf * log((N + 1) / (df + 1))                           (same)
    kl    = p_b * log((p_b + eps) / (p_bg + eps)),  p_b = c / C,
            p_bg = (df + 1) / sum_j (df_j + 1)                      (Goyal et al. 2026, sec. 3.5)
    all   = c  (only a score for logs: `select_slots` keeps every touched slot under 'all', no cut)
    Float64 so that equal inputs give bit-equal scores and the tie rule below is exact.
    """
    _check_ranking(ranking, background)
    _check_sparse(touched, counts)
    c = counts.to(torch.float64)
    if ranking == "all":
        return c
    total = c.sum()
    tf = c / total
    if ranking == "tf":
        return tf
    assert background is not None
    if touched.numel() and int(touched.max().item()) >= background.n_slots:
        raise ValueError(
            f"slot scores: slot id {int(touched.max().item())} outside the background's "
            f"{background.n_slots} slots"
        )
    df = background.df.index_select(0, touched.to(background.df.device)).to(c.device, torch.float64)
    if ranking == "tfidf":
        return tf * torch.log((background.n_batches + 1) / (df + 1))
    p_bg = (df + 1) / background.bg_norm
    return tf * torch.log((tf + KL_EPS) / (p_bg + KL_EPS))


def select_slots(
    touched: torch.Tensor,
    counts: torch.Tensor,
    ranking: str,
    top_t: int,
    background: SlotBackground | None = None,
    *,
    rule: str = "fixed",
    mass: float = 0.5,
    alpha: float = 0.01,
) -> torch.Tensor:
    """The top touched slots by `ranking`, returned as sorted ascending slot ids: top_t of them (rule
    'fixed'), or as many as the adaptive `rule` allows, never more than top_t (see `adaptive_keep`).
    Ranking 'all' is the "all indices" ablation of Lin et al. 2025's ranking study: every touched slot with
    c > 0, whatever top_t and rule (the config refuses an adaptive rule with it).

    Only slots with c > 0 are candidates. Ties are broken deterministically so every rank picks the same
    rows: higher score first, then lower slot id (a stable sort by id, then a stable descending sort by
    score). Ranking 'all' aside, top_t = 0 selects nothing; with rule 'fixed', top_t >= K selects every
    touched slot.
    """
    _check_ranking(ranking, background)
    _check_sparse(touched, counts)
    _check_rule(rule, background)
    if top_t < 0:
        raise ConfigError(f"finetune.top_t: must be >= 0, got {top_t}")
    keep = counts > 0
    touched, counts = touched[keep], counts[keep]
    if ranking == "all":
        return torch.sort(touched).values
    if top_t == 0 or touched.numel() == 0:
        return touched.new_empty(0)
    if rule == "fixed" and top_t >= touched.numel():
        return torch.sort(touched).values
    scores = slot_scores(touched, counts, ranking, background)
    by_id = torch.sort(touched, stable=True).indices
    by_score = by_id[torch.sort(scores[by_id], descending=True, stable=True).indices]
    if rule != "fixed":
        by_score = adaptive_keep(touched, counts, scores, by_score, background, rule, mass, alpha)
    return torch.sort(touched[by_score[:top_t]]).values


def _check_rule(rule: str, background: SlotBackground | None) -> None:
    if rule not in TOP_T_RULES:
        raise ConfigError(f"finetune.top_t_rule: unknown rule {rule!r}, expected one of {TOP_T_RULES}")
    if rule == "poisson" and background is None:
        raise ConfigError(
            "finetune.top_t_rule='poisson' needs background counts (df, N), but none were given"
        )


def adaptive_keep(
    touched: torch.Tensor,
    counts: torch.Tensor,
    scores: torch.Tensor,
    by_score: torch.Tensor,
    background: SlotBackground | None,
    rule: str,
    mass: float,
    alpha: float,
) -> torch.Tensor:
    """Which of the scored slots (`by_score`: positions into `touched`, best first) a batch may update, in
    the same order (the caller keeps at most top_t of them). The adaptive-t rules (Lin et al. 2025 fix t
    and leave an input-dependent t open):

    mass:    the smallest prefix holding a share `mass` of the batch's positive score mass. A batch whose
             reads concentrate on a few slots (one fact) updates few rows; a diffuse batch updates more.
    poisson: the slots whose batch count is improbably high under the background: slot i's background
             rate of reads per batch is lambda_i = -log(1 - p_i), p_i = (df_i + 1) / (N + 2) (the chance a
             background batch reads it, Laplace-smoothed, read as a Poisson process); a slot counts when
             P(X >= c_i | lambda_i) < alpha / K, Bonferroni over the K touched slots. Reads of one token
             repeat across heads, so counts are over-dispersed against Poisson: the test is liberal, and
             the top_t cap still applies.
    """
    if rule == "mass":
        ordered = scores[by_score].clamp(min=0)
        total = float(ordered.sum())
        if total <= 0:
            return by_score[:0]
        cumulative = torch.cumsum(ordered, 0)
        n = int(torch.searchsorted(cumulative, torch.tensor(mass * total, dtype=cumulative.dtype))) + 1
        return by_score[:n]
    assert background is not None
    df = background.df.index_select(0, touched.to(background.df.device)).to(torch.float64)
    p_read = (df + 1) / (background.n_batches + 2)
    rate = -torch.log1p(-p_read)
    # P(X >= c) for X ~ Poisson(rate) is the regularized lower incomplete gamma P(c, rate)
    p_value = torch.special.gammainc(counts.to(torch.float64).cpu(), rate.cpu())
    significant = (p_value < alpha / touched.numel()).to(by_score.device)
    return by_score[significant[by_score]]


def rows_of_sparse_grad(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense [len(rows), D] gradient of `rows` from a (possibly uncoalesced) sparse COO table gradient."""
    out = torch.zeros(rows.numel(), grad.shape[1], dtype=grad.dtype, device=grad.device)
    if grad._nnz() == 0 or rows.numel() == 0:
        return out
    grad = coalesced(grad)
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
        self._readers: dict[int, list[str]] = {}  # a table (a shared pool: several layers) -> its readers
        for name, table in self.tables.items():
            self._readers.setdefault(id(table), []).append(name)
        self._chosen: dict[str, torch.Tensor] = {}
        self._global_counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    reads_slots = True

    def before_backward(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor], final: bool
    ) -> None:
        """Count the slots read; after the step's last forward every count is in, so choose the rows now
        and let the last backward compute gradient rows for those only (`kernels.restrict_row_grads`):
        the rows left out would be dropped by `prepare_gradients` anyway, so the step is unchanged."""
        mask = batch["token_mask"]
        self.tokens += int(mask.sum())
        self.counter.add_slots(slots, mask)
        if final:
            self._choose()
            for table in self._tables_once().values():
                rows = torch.cat([self._chosen[n] for n in self._readers[id(table)]]).unique()
                restrict_row_grads(table, rows)

    def on_micro_batch(
        self, model: nn.Module, batch: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]
    ) -> None:
        """Nothing after a backward: the counting is done before it."""

    def _tables_once(self) -> dict[str, nn.Parameter]:
        return {names[0]: self.tables[names[0]] for names in self._readers.values()}

    def _choose(self) -> None:
        """Select each layer's rows from the step's global counts (one all-reduce)."""
        self._global_counts = global_counts = self.counter.global_counts()
        self._chosen = {}
        for name in self.tables:
            touched, counts = global_counts[name]
            self._chosen[name] = select_slots(
                touched, counts, self.ranking, self.top_t, self._bg(name), **self.rule
            )

    def prepare_gradients(self, model: nn.Module) -> dict[str, Any]:
        """Each table's gradient becomes its selected rows, summed over ranks (a sparse COO tensor with
        exactly those rows, zeros included, so the optimizer updates them)."""
        for table in self._tables_once().values():
            restrict_row_grads(table, None)
        global_counts = self._global_counts
        staged, selected_ids = selected_row_gradients(self.tables, self._chosen.__getitem__, self.value_grads)
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
