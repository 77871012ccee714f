"""Bytes a value table puts on the network per micro-batch: FSDP-gathered vs memory-parallel, computed from
the shapes, and counted from the collectives a real step issues (`CollectiveBytes`).

Per rank, for one memory layer (P ranks in the group, N tokens per rank, K = heads x topk bags, table M x D):

    FSDP (row shards)   all-gather the table in forward and again in backward (reshard_after_forward):
                        2 x (P-1)/P x M x D x param bytes received; reduce-scatter of the dense gradient:
                        (P-1)/P x M x D x reduce bytes sent
    memory-parallel     all-gather (indices int64, weights fp32) of the group's tokens: (P-1) x N x K x 12;
                        forward all-to-all of looked-up columns: (P-1) x N x D/P x param bytes, the same in
                        backward for the output gradient; backward all-to-all of weight-gradient partials:
                        (P-1) x N x K x 4; plus the token counts ((P-1) x 8)

Nothing in the memory-parallel volume grows with M.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def fsdp_table_bytes(m: int, d: int, p: int, param_bytes: int, reduce_bytes: int) -> int:
    """Bytes one rank receives (gathers) and sends (reduce-scatter) for an FSDP-sharded table."""
    share = (p - 1) / p
    return int(2 * share * m * d * param_bytes + share * m * d * reduce_bytes)


def memory_parallel_bytes(n: int, k: int, d: int, p: int, param_bytes: int) -> int:
    """Bytes one rank receives from its memory-parallel group for one lookup, forward and backward."""
    gather_bags = (p - 1) * n * k * (8 + 4)
    columns = 2 * (p - 1) * n * (d // p) * param_bytes  # forward rows, backward output gradient
    weight_grads = (p - 1) * n * k * 4
    return int(gather_bags + columns + weight_grads + (p - 1) * 8)


_COLLECTIVES = ("allgather", "reduce_scatter", "alltoall", "allreduce", "broadcast")


class CollectiveBytes(TorchDispatchMode):
    """Counts the output bytes of every c10d collective dispatched while active (what a rank receives),
    by op name. c10d ops reach the dispatcher like aten ops, FSDP2's included."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.name())
        if name.startswith("c10d::") and any(c in name for c in _COLLECTIVES):
            op = name.removeprefix("c10d::").rstrip("_")
            self.calls[op] += 1
            self.bytes[op] += _received_bytes(op, args)
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict[str, Any]:
        return {"total_bytes": sum(self.bytes.values()), "bytes": dict(self.bytes), "calls": dict(self.calls)}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _group(args: tuple) -> tuple[int, int]:
    """(size, rank) of the process group among a c10d op's arguments (boxed as a ScriptObject)."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            pg = dist.ProcessGroup.unbox(a)
            return pg.size(), pg.rank()
    return 1, 0


def _received_bytes(op: str, args: tuple) -> int:
    """Bytes this rank receives from other ranks: an all-gather's output minus its own input, an
    all-to-all's output minus the chunk it keeps, a reduce-scatter's input minus its output (ring), an
    all-reduce 2 (P-1)/P of its size (ring), a broadcast its size."""
    p, rank = _group(args)
    out = _nbytes(args[0]) if args else 0
    if op.startswith("allgather") or op == "_allgather_base":
        return max(0, out - _nbytes(args[1]))
    if op.startswith("alltoall"):
        # alltoall_base_(output, input, group, output_split_sizes, input_split_sizes, ...)
        splits = args[3] if len(args) > 3 and isinstance(args[3], (list, tuple)) and args[3] else None
        t = _tensors(args[0])
        if splits and t:
            row = t[0].element_size() * (t[0][0].numel() if t[0].dim() > 1 else 1)
            return out - int(splits[rank]) * row
        return out - out // max(p, 1)
    if "reduce_scatter" in op:
        return max(0, _nbytes(args[1]) - out)
    if op.startswith("allreduce"):
        return int(2 * (p - 1) / p * out)
    return out
