"""Query batch-norm statistics over every data-parallel rank's tokens (DESIGN invariant 2: FSDP on N ranks
= 1 rank with the same global batch): per-rank statistics would normalise each rank's queries differently.
Parallelizing swaps each `models.memory.QueryBatchNorm` for a `SyncQueryBatchNorm`, as torch's
`SyncBatchNorm.convert_sync_batchnorm` does for `BatchNorm*d`."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from titan_mem.models.memory import QueryBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank. Each rank's loss depends on y, so dL/dx_r is the sum over
    ranks of their dL_r/dy: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncQueryBatchNorm(QueryBatchNorm):
    """`QueryBatchNorm` whose per-channel sums and row count are summed over the default process group,
    differentiably, before the mean and variance are formed (as SyncBatchNorm)."""

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return stats
        return _AllReduceSum.apply(stats)


def sync_query_batchnorm(root: nn.Module) -> None:
    """Swap every `QueryBatchNorm` under `root` for a `SyncQueryBatchNorm` holding the same parameters and
    buffers (on the meta device before materialisation, or already filled)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is QueryBatchNorm:
                synced = SyncQueryBatchNorm(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                    device=child.running_mean.device if child.running_mean is not None else None,
                )  # fmt: skip
                synced.load_state_dict(child.state_dict(), assign=True)
                synced.train(child.training)
                setattr(parent, name, synced)
