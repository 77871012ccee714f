"""Process-group setup that works the same under torchrun (1..N nodes) and as a plain single process."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_mem.errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun job (or make a one-rank group) and build the 1-D data-parallel mesh.

    NCCL (plus gloo for CPU tensors) on CUDA, gloo on CPU. A single process without torchrun still gets a
    process group, so FSDP2 and DCP take one code path for every world size.
    """
    standalone = "RANK" not in os.environ
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda: no CUDA device is available on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if standalone:
            # No launcher: an in-memory store, no port to pick or collide on.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(dist.get_rank(), world, local_rank, device, mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a finished command without interpreter teardown; call after `shutdown()`.

    Processes that used gloo collectives sometimes abort with SIGABRT ("terminate called without an active
    exception") *after* destroy_process_group, in Python finalisation: faulthandler shows the main thread
    alone, with no Python frame, i.e. C++ objects torn down in an order we do not control. Files are
    written and closed or renamed before this point, so skipping finalisation loses nothing and the exit
    code is the command's own.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place), returning the tensor for chaining."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_json(obj: Any) -> Any:
    """Rank 0's JSON-able `obj` on every rank (CPU tensors: gloo serves them under NCCL too). JSON, not
    pickle, so a rank never unpickles what it receives."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(int(size), dtype=torch.uint8)
    )
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.tolist()).decode())
