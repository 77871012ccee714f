"""Product-key memory layer: a drop-in replacement for a transformer block's FFN.

Per token and head, the query is split in two halves; each half is scored against `n_keys` half-keys, the
top-k of each half form k*k candidate slots whose score is the sum of the two half scores (Lample et al.
2019, "Large Memory Layers with Product Keys", eq. 4-5: the top-k of the k*k sums equals the top-k over
all n_keys**2 slots). The k winners are softmax-weighted (fp32) and their value rows summed over heads.
Memory+ (Berges et al. 2024, "Memory Layers at Scale", sec. 3) gates the lookup:
    out = value_proj(lookup(x) * silu(gate_proj(x))).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from titan_mem.kernels import value_lookup
from titan_mem.models.args import MemoryArgs


class ValueTable(Protocol):
    """What a memory layer reads: `MemoryValues`, or the column-sharded table parallelizing swaps in."""

    weight: nn.Parameter
    backend: str

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor, sparse_grad: bool) -> torch.Tensor: ...


class MemoryValues(nn.Module):
    """The value table [n_slots, v_dim]; its own module so several memory layers can share one pool.

    Whole, or FSDP-sharded by rows. Parallelizing may swap it for `parallel.memory_parallel.
    ColumnShardedValues` (this rank's column slice), which has the same `weight`/`backend`/`lookup` face.
    """

    def __init__(self, n_slots: int, v_dim: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_slots, v_dim))
        self.backend = "auto"  # lookup kernel: kernels.LOOKUP_BACKENDS
        self.zero_init = zero_init  # a retrofit `add` memory (MemoryArgs.beside_ffn): MemoryLayer says why

    def init_weights(self) -> None:
        """The one place a table gets its initial rows, on every path (an owned table from its layer's
        `init_weights`, a shared pool from the Transformer's root init, FSDP's seeded materialisation; the
        memory-parallel column shards are cut from the initialised whole)."""
        if self.zero_init:
            nn.init.zeros_(self.weight)
            return
        # XLM PKM: values ~ N(0, v_dim^-1/2).
        nn.init.normal_(self.weight, mean=0.0, std=self.weight.shape[1] ** -0.5)

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
        """Weighted bags of rows [N, K] -> [N, v_dim]."""
        return value_lookup(self.weight, indices, weights, sparse_grad, self.backend)


_recompute = threading.local()


@contextlib.contextmanager
def _recomputing(inner: contextlib.AbstractContextManager | None = None):
    _recompute.active = True
    try:
        with inner if inner is not None else contextlib.nullcontext():
            yield
    finally:
        _recompute.active = False


def recompute_context(
    policy: Callable | None = None,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for eager `torch.utils.checkpoint`: marks the backward-time recompute of a checkpointed
    block, so layers with side effects in forward (batch-norm running statistics) apply them once per step.

    With a `policy` (functools.partial it in), op-level selective checkpointing as well: ops the policy
    saves are replayed from the forward (`create_selective_checkpoint_contexts`), the rest recomputed.
    Compiled blocks use other contexts (models.transformer._CONTEXT_FNS says why).
    """
    if policy is None:
        return contextlib.nullcontext(), _recomputing()
    forward, recompute = create_selective_checkpoint_contexts(policy)
    return forward, _recomputing(recompute)


def is_recomputing() -> bool:
    return getattr(_recompute, "active", False)


class QueryBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over query rows [N, C] (Lample et al. 2019, sec. 3.2: batch-normalised queries spread
    the reads over the keys), computed from per-channel sums so that the statistics can cover more rows
    than this process holds: `parallel.sync_batchnorm.SyncQueryBatchNorm`, swapped in when parallelizing,
    sums them over every data-parallel rank (DESIGN invariant 2: N ranks = 1 rank). Subclassing BatchNorm1d
    keeps its parameter/buffer names (checkpoints load), its `reset_parameters` init and the
    `isinstance(mod, nn.BatchNorm1d)` checks that freeze it in finetuning.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"QueryBatchNorm: expected [N, C] queries, got {tuple(x.shape)}")
        if not self.training:
            return super().forward(x)  # running statistics: no communication
        xf = x.float()  # statistics in fp32 also under bf16 mixed precision
        mean, var, count = self._global_stats(xf)
        if self.track_running_stats and not is_recomputing():  # the recompute sees the same batch again
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        # y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta (Ioffe & Szegedy 2015, algorithm 1).
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)

    def _global_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance over all ranks' rows, and the global row count.

        Shifted-data variance (Chan, Golub & LeVeque 1983): var = E[(x-K)^2] - E[x-K]^2 with K the running
        mean, identical on every rank, which avoids the cancellation of E[x^2] - E[x]^2 once K ~ the mean.
        """
        shift = self.running_mean.detach().float() if self.running_mean is not None else x.new_zeros(())
        d = x - shift
        count = x.new_full((1,), float(x.shape[0]))
        stats = self.reduce_stats(torch.cat([d.sum(0), (d * d).sum(0), count]))
        c = x.shape[1]
        n = stats[2 * c :]
        mean_d = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean_d * mean_d).clamp_min(0.0)
        return shift + mean_d, var, n

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """[sum of x - K, sum of (x - K)^2, row count] over the rows the statistics cover: this process's."""
        return stats

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """BatchNorm1d's update: exponential average (or cumulative if momentum is None), unbiased var."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1.0)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k slots of a product-key memory.

    query: [N, H, k_dim]; keys: [H, 2, n_keys, k_dim // 2]. Returns (scores [N, H, k], slots [N, H, k]),
    slots in [0, n_keys**2) as i1 * n_keys + i2. Scores are the raw (pre-softmax) dot products.
    """
    n_keys = keys.shape[2]
    half = keys.shape[3]
    q1, q2 = query[..., :half], query[..., half:]
    s1 = torch.einsum("nhd,hkd->nhk", q1, keys[:, 0])  # [N, H, n_keys]
    s2 = torch.einsum("nhd,hkd->nhk", q2, keys[:, 1])
    top1, idx1 = s1.topk(topk, dim=-1)  # [N, H, k]
    top2, idx2 = s2.topk(topk, dim=-1)
    cand = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # [N, H, k*k]
    cand_idx = (idx1.unsqueeze(-1) * n_keys + idx2.unsqueeze(-2)).flatten(-2)
    scores, pos = cand.topk(topk, dim=-1)
    slots = cand_idx.gather(-1, pos)
    return scores, slots


class MemoryLayer(nn.Module):
    """PKM / Memory+ layer. `forward(x, return_slots=True)` also returns the slots each token read: what the
    slot selector and the background counter count (Lin et al. 2025, sec. 3).

    Beside a kept FFN (retrofit `add`, `MemoryArgs.beside_ffn`) the output is `out * out_gate` and must be
    exactly 0 at step 0, so the retrofitted model starts as its base bit for bit. The zero comes from the
    *values* (all rows 0, so every bag is 0 and so is value_proj(0 * silu(.))), not from the gate (ones):
    d loss / d values = value_proj^T (dL/dout * gate) * silu(gate_proj(x)) is then non-zero from the first
    step, which sparse finetuning needs (it updates value rows only). A zero gate instead zeroes that
    gradient at step 0 and keeps it proportional to the gate after a short heal: value rows moved by ~1e-6
    and a sparse finetune learned next to nothing (docs/results.md, "Retrofit"). The gate stays a learned
    per-channel scale, so healing can still close channels whose memory output hurts the base (the retrofit
    peers' lesson, docs/design.md, "Retrofit peers' lessons"). Queries, keys and the Memory+ projections get
    no gradient while the values are 0 (the output does not depend on them); the first value update gives them
    one.
    """

    def __init__(self, dim: int, args: MemoryArgs, v_dim: int, shared_values: MemoryValues | None = None):
        super().__init__()
        self.dim, self.args, self.v_dim = dim, args, v_dim
        self.heads, self.topk, self.k_dim = args.heads, args.topk, args.k_dim
        self.half = args.k_dim // 2
        self.query_proj = nn.Linear(dim, args.heads * args.k_dim, bias=False)
        if args.query_norm == "batchnorm":
            self.query_norm: nn.Module = QueryBatchNorm(args.heads * args.k_dim)
        elif args.query_norm == "rms":
            self.query_norm = nn.RMSNorm(args.k_dim, eps=1e-6)
        else:
            self.query_norm = nn.Identity()
        self.keys = nn.Parameter(torch.empty(args.heads, 2, args.n_keys, self.half))
        if shared_values is None:
            self.values = MemoryValues(args.n_slots, v_dim, zero_init=args.beside_ffn)
            self._shared: list[ValueTable] = []
        else:
            # Held in a list so the shared pool is registered once, by its owner (the Transformer).
            self._shared = [shared_values]
        if args.plus:
            self.gate_proj = nn.Linear(dim, v_dim, bias=False)
            self.value_proj = nn.Linear(v_dim, dim, bias=False)
        if args.beside_ffn:  # retrofit `add`: out * gate, gate = 1 and values = 0 at init (see the class)
            self.out_gate = nn.Parameter(torch.empty(dim))
        self.sparse_grad = False  # sparse finetuning: row-sparse table gradient (see kernels.value_lookup)

    @property
    def value_table(self) -> ValueTable:
        return self._shared[0] if self._shared else self.values

    def use_value_table(self, values: ValueTable) -> None:
        """Read `values` from now on (parallelizing swaps in a column-sharded table with the same face):
        an owned table is replaced; a shared pool is re-pointed (its owner, the Transformer, holds the new
        one)."""
        if self._shared:
            self._shared[0] = values
        else:
            self.values = values

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.query_proj.weight, std=self.dim**-0.5)
        if isinstance(self.query_norm, (nn.RMSNorm, QueryBatchNorm)):
            self.query_norm.reset_parameters()  # BatchNorm: also resets running stats and the batch count
        # XLM PKM: half-keys ~ U(-1/sqrt(half), 1/sqrt(half)).
        bound = 1.0 / math.sqrt(self.half)
        nn.init.uniform_(self.keys, -bound, bound)
        if not self._shared:
            self.values.init_weights()
        if self.args.plus:
            nn.init.normal_(self.gate_proj.weight, std=self.dim**-0.5)
            nn.init.trunc_normal_(self.value_proj.weight, std=init_std)
        if self.args.beside_ffn:
            nn.init.ones_(self.out_gate)

    def lookup_slots(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [N, H, k] (fp32 softmax weights) and slots [N, H, k] for flattened tokens x: [N, dim]."""
        q = self.query_proj(x)
        if isinstance(self.query_norm, QueryBatchNorm):
            q = self.query_norm(q)
        q = q.view(-1, self.heads, self.k_dim)
        if isinstance(self.query_norm, nn.RMSNorm):
            q = self.query_norm(q)
        scores, slots = product_key_topk(q.float(), self.keys.float(), self.topk)
        return F.softmax(scores, dim=-1), slots

    def forward(
        self, x: torch.Tensor, return_slots: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[..., dim] -> [..., dim]; with `return_slots`, also the slots read, [..., heads, topk] int64."""
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        weights, slots = self.lookup_slots(flat)
        n = flat.shape[0]
        bag = self.value_table.lookup(slots.view(n, -1), weights.view(n, -1), self.sparse_grad)
        bag = bag.to(x.dtype)
        if self.args.plus:
            out = self.value_proj(bag * F.silu(self.gate_proj(flat)))
        else:
            out = bag
        if self.args.beside_ffn:
            out = out * self.out_gate
        if return_slots:
            return out.view(shape), slots.detach().view(*shape[:-1], self.heads, self.topk)
        return out.view(shape)


# The one definition of "a memory value table" by name: `layers.N.feed_forward.values.weight`, or a shared
# pool's `shared_memory_values.weight` registered once by the Transformer.
VALUE_TABLE_SUFFIXES = ("values.weight",)


def is_value_table(fqn: str) -> bool:
    """Whether a model state-dict name is a memory value table (checkpoints, patches, FSDP policy)."""
    return fqn.endswith(VALUE_TABLE_SUFFIXES)
