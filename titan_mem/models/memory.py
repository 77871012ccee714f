"""Product-key memory layer: a drop-in replacement for a transformer block's FFN.

Per token and head, the query is split in two halves; each half is scored against `n_keys` half-keys, the
top-k of each half form k*k candidate slots whose score is the sum of the two half scores (Lample et al.
2019, "Large Memory Layers with Product Keys", eq. 4-5: the top-k of the k*k sums equals the top-k over
all n_keys**2 slots). The k winners are softmax-weighted (fp32) and their value rows summed over heads.
Memory+ (Berges et al. 2024, "Memory Layers at Scale", sec. 3) gates the lookup:
    out = value_proj(lookup(x) * silu(gate_proj(x))).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_mem.kernels import value_lookup
from titan_mem.models.args import MemoryArgs


class MemoryValues(nn.Module):
    """The value table [n_slots, v_dim]; its own module so several memory layers can share one pool."""

    def __init__(self, n_slots: int, v_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_slots, v_dim))

    def init_weights(self) -> None:
        # XLM PKM: values ~ N(0, v_dim^-1/2).
        nn.init.normal_(self.weight, mean=0.0, std=self.weight.shape[1] ** -0.5)


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
    """PKM / Memory+ layer. Set `record_indices = True` to keep the slots of the last forward."""

    def __init__(self, dim: int, args: MemoryArgs, v_dim: int, shared_values: MemoryValues | None = None):
        super().__init__()
        self.dim, self.args, self.v_dim = dim, args, v_dim
        self.heads, self.topk, self.k_dim = args.heads, args.topk, args.k_dim
        self.half = args.k_dim // 2
        self.query_proj = nn.Linear(dim, args.heads * args.k_dim, bias=False)
        if args.query_norm == "batchnorm":
            self.query_norm: nn.Module = nn.BatchNorm1d(args.heads * args.k_dim)
        elif args.query_norm == "rms":
            self.query_norm = nn.RMSNorm(args.k_dim, eps=1e-6)
        else:
            self.query_norm = nn.Identity()
        self.keys = nn.Parameter(torch.empty(args.heads, 2, args.n_keys, self.half))
        if shared_values is None:
            self.values = MemoryValues(args.n_slots, v_dim)
            self._shared: list[MemoryValues] = []
        else:
            # Held in a list so the shared pool is registered once, by its owner (the Transformer).
            self._shared = [shared_values]
        if args.plus:
            self.gate_proj = nn.Linear(dim, v_dim, bias=False)
            self.value_proj = nn.Linear(v_dim, dim, bias=False)
        self.record_indices = False
        self.sparse_grad = False  # sparse finetuning: row-sparse table gradient (see kernels.value_lookup)
        self.last_indices: torch.Tensor | None = None

    @property
    def value_table(self) -> MemoryValues:
        return self._shared[0] if self._shared else self.values

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.query_proj.weight, std=self.dim**-0.5)
        if isinstance(self.query_norm, (nn.RMSNorm, nn.BatchNorm1d)):
            self.query_norm.reset_parameters()
            if isinstance(self.query_norm, nn.BatchNorm1d):
                self.query_norm.reset_running_stats()
        # XLM PKM: half-keys ~ U(-1/sqrt(half), 1/sqrt(half)).
        bound = 1.0 / math.sqrt(self.half)
        nn.init.uniform_(self.keys, -bound, bound)
        if not self._shared:
            self.values.init_weights()
        if self.args.plus:
            nn.init.normal_(self.gate_proj.weight, std=self.dim**-0.5)
            nn.init.trunc_normal_(self.value_proj.weight, std=init_std)

    def lookup_slots(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [N, H, k] (fp32 softmax weights) and slots [N, H, k] for flattened tokens x: [N, dim]."""
        q = self.query_proj(x)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q)
        q = q.view(-1, self.heads, self.k_dim)
        if isinstance(self.query_norm, nn.RMSNorm):
            q = self.query_norm(q)
        scores, slots = product_key_topk(q.float(), self.keys.float(), self.topk)
        return F.softmax(scores, dim=-1), slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        weights, slots = self.lookup_slots(flat)
        if self.record_indices:
            self.last_indices = slots.detach().view(*shape[:-1], self.heads, self.topk)
        n = flat.shape[0]
        bag = value_lookup(self.value_table.weight, slots.view(n, -1), weights.view(n, -1), self.sparse_grad)
        bag = bag.to(x.dtype)
        if self.args.plus:
            out = self.value_proj(bag * F.silu(self.gate_proj(flat)))
        else:
            out = bag
        return out.view(shape)
