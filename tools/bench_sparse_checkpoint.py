"""Benchmark: size and save time of a sparse-finetuning checkpoint (knowledge patch + row-optimizer state)
against a whole-model checkpoint, at a given value-table shape.

It runs the real row-sparse optimizer for `--steps` steps of `--top-t` random rows on an `--n-slots` x
`--v-dim` fp32 table, then writes (a) the sparse checkpoint's two files with the library's own writers and
(b) the table alone as a DCP checkpoint (a lower bound for a full checkpoint of any model holding it), and
hashes the table once (the base identity a run computes once, then caches). The whole-model size of the 1B
model in fp32 (11.7 GB, from the dry run's parameter count) is not written here.
    python tools/bench_sparse_checkpoint.py --n-slots 1048576 --v-dim 1024 --steps 100 --top-t 500
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_file

from titan_mem.checkpoint.dcp_index import single_process
from titan_mem.checkpoint.patches import Lineage, sha256, spec, write_patch
from titan_mem.components.bench import machine_info, write_report
from titan_mem.parallel.value_grads import value_table_grads
from titan_mem.sparse.update import RowSparseOptimizer

TABLE = "layers.12.feed_forward.values.weight"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(n_slots: int, v_dim: int, steps: int, top_t: int, optimizer: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    table = nn.Parameter(torch.empty(n_slots, v_dim).normal_(0, v_dim**-0.5, generator=gen))
    cfg = SimpleNamespace(
        name=optimizer,
        lr=2.0,
        memory_lr=None,
        momentum=0.0,
        memory_weight_decay=0.0,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    tables = {"layers.12.feed_forward": table}
    opt = RowSparseOptimizer(tables, cfg, value_table_grads(tables))
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = torch.randperm(n_slots, generator=gen)[:top_t].sort().values
        grad = torch.randn(top_t, v_dim, generator=gen)
        table.grad = torch.sparse_coo_tensor(
            rows[None], grad, table.shape, is_coalesced=True, check_invariants=False
        )
        opt.step()
    step_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    base_hash = sha256(table.data)
    hash_s = time.perf_counter() - t0
    lineage = Lineage(root={TABLE: {**spec(table.data), "sha256": base_hash}}, applied=[])
    with tempfile.TemporaryDirectory(dir="outputs") as tmp:
        sparse_dir, full_dir = Path(tmp) / "sparse", Path(tmp) / "full"
        sparse_dir.mkdir()
        t0 = time.perf_counter()
        changed = opt.changed_rows()["layers.12.feed_forward"]
        write_patch(
            sparse_dir / "patch.safetensors", {TABLE: changed}, {TABLE: spec(table.data)}, lineage, "base"
        )
        tensors, meta = opt.state_tensors()
        save_file(tensors, str(sparse_dir / "row_optimizer.safetensors"), metadata=meta)
        sparse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with single_process():
            dcp.save(
                {"model": {TABLE: table.data}},
                storage_writer=dcp.FileSystemWriter(str(full_dir)),
                no_dist=True,
            )
        full_s = time.perf_counter() - t0
        sparse_bytes, full_bytes = _size(sparse_dir), _size(full_dir)
        shutil.rmtree(full_dir)
    return {
        "n_slots": n_slots,
        "v_dim": v_dim,
        "steps": steps,
        "top_t": top_t,
        "optimizer": optimizer,
        "rows_ever_updated": int(changed[0].numel()),
        "row_step_s": step_s,
        "sparse_checkpoint_bytes": sparse_bytes,
        "sparse_save_s": sparse_s,
        "table_only_dcp_bytes": full_bytes,
        "table_only_dcp_save_s": full_s,
        "size_ratio_table_over_sparse": full_bytes / sparse_bytes,
        "base_table_sha256_s": hash_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-slots", type=int, default=1 << 20)
    p.add_argument("--v-dim", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    Path("outputs").mkdir(exist_ok=True)
    result = run(a.n_slots, a.v_dim, a.steps, a.top_t, a.optimizer)
    write_report({"machine": machine_info(), "command": "tools/bench_sparse_checkpoint.py", **result}, a.out)


if __name__ == "__main__":
    main()
