"""SyncQueryBatchNorm (what parallelizing makes of a QueryBatchNorm) on W ranks = nn.BatchNorm1d on one
process over the concatenated rows (DESIGN invariant 2).

Every rank builds the same global batch, keeps an uneven slice of it (so the all-reduced count matters),
and checks its outputs, input gradients, summed affine gradients and running stats against a single-process
BatchNorm1d on the whole batch. Any mismatch raises, so the launch exits non-zero.
"""

import torch
import torch.distributed as dist

from titan_mem.distributed import exit_process
from titan_mem.parallel.sync_batchnorm import SyncQueryBatchNorm

CHANNELS, ROWS = 6, 24
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _slice(rank: int, world: int) -> slice:
    """Uneven row ranges: rank r gets a share growing with r (for 2 ranks: 8 and 16 rows)."""
    bounds = [ROWS * sum(range(1, r + 1)) // sum(range(1, world + 1)) for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def _check_step(ours: SyncQueryBatchNorm, ref: torch.nn.BatchNorm1d, g: torch.Generator, step: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(ROWS, CHANNELS, generator=g) * 2 + 0.5 * step
    upstream = torch.randn(ROWS, CHANNELS, generator=g)
    mine = _slice(rank, world)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * upstream).sum().backward()
    x_mine = x[mine].clone().requires_grad_(True)
    y = ours(x_mine)
    (y * upstream[mine]).sum().backward()
    torch.testing.assert_close(y, y_ref[mine], **TOL)
    torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], **TOL)
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad.clone()
        dist.all_reduce(grad)  # what FSDP's gradient reduction (a sum here) would produce
        torch.testing.assert_close(grad, getattr(ref, name).grad, **TOL)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


def main() -> None:
    dist.init_process_group("gloo")
    ref, ours = torch.nn.BatchNorm1d(CHANNELS), SyncQueryBatchNorm(CHANNELS)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)  # same on every rank: the same global batches
    for step in range(3):
        ref.zero_grad(), ours.zero_grad()
        _check_step(ours, ref, g, step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # skip interpreter teardown, which aborts now and then after gloo use (see exit_process)
