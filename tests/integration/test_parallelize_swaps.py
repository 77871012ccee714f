"""The model package holds no parallelism; parallelizing swaps it in (issue 21): column-sharded value tables
(`parallel.memory_parallel.ColumnShardedValues`) and query batch-norm statistics over all ranks
(`parallel.sync_batchnorm.SyncQueryBatchNorm`), with the memory layers re-pointed to a shared pool's split."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from conftest import REPO, TINY, run_one_rank

MODELS = REPO / "titan_mem" / "models"
PARALLEL_MODULES = ("torch.distributed", "titan_mem.parallel", "titan_mem.distributed")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_model_package_imports_no_parallelism():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 5
    offenders = {f.name: sorted(n for n in _imports(f) if n.startswith(PARALLEL_MODULES)) for f in files}
    assert {f: n for f, n in offenders.items() if n} == {}


def _build(degree: int) -> dict:
    from titan_mem import config as config_mod
    from titan_mem.components.model import build_model
    from titan_mem.data import build_tokenizer
    from titan_mem.distributed import init_distributed
    from titan_mem.parallel.memory_parallel import ColumnShardedValues
    from titan_mem.parallel.sync_batchnorm import SyncQueryBatchNorm

    cfg = config_mod.parse_args([
        *TINY, "--model.n_layers=3", "--model.memory_layers=[0, 2]", "--model.memory_shared_values=true",
        "--model.memory_query_norm=batchnorm", f"--parallelism.memory_parallel_degree={degree}",
    ])  # fmt: skip
    model, _ = build_model(cfg, init_distributed("cpu"), build_tokenizer(cfg.tokenizer))
    layers = list(model.memory_layers().values())
    tables = {id(layer.value_table) for layer in layers}
    registered = [n for n, p in model.named_parameters() if n.endswith("values.weight")]
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    logits.float().square().mean().backward()
    pool = layers[0].value_table
    grad = pool.weight.grad  # whole table: FSDP's DTensor shard; split table: this rank's columns
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return {
        "split": [isinstance(layer.value_table, ColumnShardedValues) for layer in layers],
        "synced": [isinstance(layer.query_norm, SyncQueryBatchNorm) for layer in layers],
        "one_table": len(tables) == 1 and pool is model.shared_memory_values,
        "registered": registered,
        "logits": logits.detach(),
        "pool_grad": grad.clone(),
        "running_mean": layers[1].query_norm.running_mean.clone(),
    }


def _build_both() -> tuple[dict, dict]:
    return _build(0), _build(-1)


def test_parallelizing_swaps_in_split_tables_and_synced_batchnorm(tmp_path):
    whole, split = run_one_rank(_build_both, tmp_path)
    assert whole["split"] == [False, False] and split["split"] == [True, True]
    assert whole["synced"] == split["synced"] == [True, True]
    # a shared pool is split once, registered once, and both layers read the split one
    assert whole["one_table"] and split["one_table"]
    assert whole["registered"] == split["registered"] == ["shared_memory_values.weight"]
    torch.testing.assert_close(split["logits"], whole["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split["pool_grad"], whole["pool_grad"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(split["running_mean"], whole["running_mean"])
