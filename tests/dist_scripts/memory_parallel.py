"""Memory-parallel value tables on W ranks = one whole table (DESIGN invariant 2), and DCP round trips.

    memory_parallel.py equivalence            outputs, weight and table gradients vs the whole table
    memory_parallel.py save DIR DEGREE        a table + AdamW state after 2 steps, saved by DCP
    memory_parallel.py load DIR DEGREE REF    load DIR into a table split over DEGREE ranks (0 = whole),
                                              check it bit for bit against REF (save's DIR.ref.pt), then
                                              save it again to DIR.re

Ranks hold uneven token counts (as in evaluation), bags repeat rows within and across tokens. Any mismatch
raises, so the launch exits non-zero.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from titan_mem.checkpoint.manager import ModelState, OptimizerState
from titan_mem.distributed import exit_process, init_distributed
from titan_mem.models.memory import MemoryValues
from titan_mem.parallel.memory_parallel import ColumnShardedValues, column_shard_of, memory_parallel_mesh

M, D, K = 40, 12, 6
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _whole_table() -> MemoryValues:
    torch.manual_seed(0)
    values = MemoryValues(M, D)
    values.init_weights()
    return values


def _split(degree: int) -> MemoryValues | ColumnShardedValues:
    values = _whole_table()
    if degree:
        return ColumnShardedValues(values, memory_parallel_mesh("cpu", dist.get_world_size(), degree))
    return values


def _bags(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every rank's (indices, weights, upstream gradient); rank r holds 3 + 2r tokens."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for r in range(world):
        n = 3 + 2 * r
        idx = torch.randint(0, M // 2, (n, K), generator=g)  # half the rows: many repeats
        idx[:, 1] = idx[:, 0]  # a row twice in one bag
        out.append((idx, torch.rand(n, K, generator=g), torch.randn(n, D, generator=g)))
    return out


def _full_grad(values: MemoryValues) -> torch.Tensor:
    """The table gradient over every rank's tokens. A row-sparse one is left to the slot selector to sum
    over replicas (it reduces only the selected rows); done here by hand."""
    grad, shard = values.weight.grad, column_shard_of(values.weight)
    if grad.is_sparse:
        grad = grad.to_dense()
        if shard is not None and shard.replicas > 1:
            dist.all_reduce(grad, group=shard.replicate_group)
    return shard.gather_columns(grad) if shard is not None else grad


def equivalence() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for degree in sorted({world, 1}):  # one group of W; W replicas of one rank
        for sparse_grad in (False, True):
            ref, ours = _whole_table(), _split(degree)
            bags = _bags(degree, world)
            ref_out = w_ref = None
            for r, (idx, w, up) in enumerate(bags):  # the reference sees every rank's tokens
                w = w.clone().requires_grad_(r == rank)
                out = ref.lookup(idx, w, False)
                (out * up).sum().backward()
                if r == rank:
                    ref_out, w_ref = out.detach(), w
            idx, w, up = bags[rank]
            w = w.clone().requires_grad_(True)
            out = ours.lookup(idx, w, sparse_grad)
            (out * up).sum().backward()
            torch.testing.assert_close(out.detach(), ref_out, **TOL)
            torch.testing.assert_close(w.grad, w_ref.grad, **TOL)
            torch.testing.assert_close(_full_grad(ours), ref.weight.grad, **TOL)
            assert ours.weight.grad.is_sparse == sparse_grad


def _train(values: MemoryValues) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(values.parameters(), lr=0.1)
    for step in range(2):
        idx, w, up = _bags(step, dist.get_world_size())[dist.get_rank()]
        (values.lookup(idx, w, False) * up).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _states(values: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": ModelState(values), "optimizer": OptimizerState(values, opt)}


def _whole(t: torch.Tensor, values: MemoryValues) -> torch.Tensor:
    shard = column_shard_of(values.weight)
    return shard.gather_columns(t) if shard is not None else t


def save(folder: str, degree: int) -> None:
    """Also writes `folder`.ref.pt: the whole table and AdamW moments, to compare loads with, bit for bit."""
    values = _split(degree)
    opt = _train(values)
    dcp.save(_states(values, opt), checkpoint_id=folder)
    state = opt.state[values.weight]
    ref = {k: _whole(t.detach(), values) for k, t in [("weight", values.weight), *state.items()] if t.dim()}
    if dist.get_rank() == 0:
        torch.save(ref, folder + ".ref.pt")


def load(folder: str, degree: int, ref_file: str) -> None:
    values = _split(degree)
    opt = torch.optim.AdamW(values.parameters(), lr=0.1)
    dcp.load(_states(values, opt), checkpoint_id=folder)
    ref = torch.load(ref_file, weights_only=True)
    shard = column_shard_of(values.weight)
    cols = shard.cols if shard is not None else slice(None)
    state = opt.state[values.weight]
    assert float(state["step"]) == 2.0
    for key, got in [
        ("weight", values.weight.data),
        ("exp_avg", state["exp_avg"]),
        ("exp_avg_sq", state["exp_avg_sq"]),
    ]:
        assert torch.equal(got, ref[key][:, cols]), key
    dcp.save(_states(values, opt), checkpoint_id=folder + ".re")


def main() -> None:
    init_distributed("cpu")  # torchrun's group, or a one-rank group for a plain launch
    verb = sys.argv[1]
    if verb == "equivalence":
        equivalence()
    elif verb == "save":
        save(sys.argv[2], int(sys.argv[3]))
    else:
        load(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
