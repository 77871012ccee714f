"""What a trainer checkpoint holds: the whole model (pretraining, full/LoRA finetuning), or, in sparse
memory finetuning, a knowledge patch on the base plus the row-optimizer state.

A sparse checkpoint `step-N/` is a DCP folder with the small state only (step, schedule, each rank's data
position and RNG) and two safetensors files written by rank 0 before the folder is renamed into place:
`patch.safetensors` (every value row updated so far: ids, base values, current values, and the base's
lineage, see `patches`) and `row_optimizer.safetensors` (state of those rows). Its size follows the rows
ever selected, not the model. Resume = load the base (`checkpoint.initial_load_path`), check it is the base
the patch was made on, put the patched rows back, load the row state onto each table's own device.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from titan_mem.checkpoint.dcp_index import open_dcp
from titan_mem.checkpoint.manager import CheckpointManager, ModelState, OptimizerState
from titan_mem.checkpoint.patches import (
    Lineage,
    Patch,
    after,
    apply_rows,
    read_lineage,
    read_patch,
    spec,
    write_patch,
)
from titan_mem.distributed import all_reduce_sum
from titan_mem.errors import CheckpointError
from titan_mem.parallel.memory_parallel import column_shard_of

PATCH_FILE = "patch.safetensors"
ROW_OPTIMIZER_FILE = "row_optimizer.safetensors"


def is_sparse_checkpoint(path: Path) -> bool:
    """A checkpoint folder holding a knowledge patch instead of the model."""
    return (Path(path) / PATCH_FILE).is_file()


class FullContent:
    """The whole model and the optimizer, sharded in DCP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def dcp_states(self) -> dict[str, Stateful]:
        return {"model": ModelState(self.model), "optimizer": OptimizerState(self.model, self.optimizer)}

    def file_writer(self) -> None:
        """Every rank, before a save: no files beyond DCP."""
        return None

    def restore_files(self, folder: Path) -> None:
        """Every rank, after the DCP states are loaded: nothing beyond DCP."""


class SparseContent:
    """Sparse finetuning: row-optimizer state always as a file; the model as a patch (`sparse`) or whole."""

    def __init__(self, model: nn.Module, optimizer: Any, base: str | None, cache: Path, save_model: bool):
        self.model, self.optimizer, self.save_model = model, optimizer, save_model
        self.base = Path(base) if base else None
        self.cache = cache
        fqn = {id(p): n for n, p in model.named_parameters()}
        self.fqn = {name: fqn[id(p)] for name, p in optimizer.tables.items()}
        self._lineage: Lineage | None = None

    def dcp_states(self) -> dict[str, Stateful]:
        return {"model": ModelState(self.model)} if self.save_model else {}

    # ------------------------------------------------------------------ save (rank 0)

    def file_writer(self) -> Callable[[Path], None]:
        """Every rank, before a save: collect what the files hold (whole rows, gathered over the columns of
        a memory-parallel table); returns what rank 0 runs to write them into the partial folder."""
        tensors, meta = self.optimizer.state_tensors()
        changed = None if self.save_model else self.optimizer.changed_rows()

        def write(folder: Path) -> None:
            from safetensors.torch import save_file

            save_file(tensors, str(folder / ROW_OPTIMIZER_FILE), metadata=meta)
            if changed is None:
                return
            if self.base is None:
                raise CheckpointError(
                    "checkpoint: a sparse checkpoint needs checkpoint.initial_load_path (its base)"
                )
            tables, specs = {}, {}
            for name, (rows, base_rows, now) in changed.items():
                fqn = self.fqn[name]
                tables[fqn] = (rows, base_rows, now)
                # whole rows: the table's shape, not a column shard's
                specs[fqn] = {**spec(now), "shape": [self.optimizer.tables[name].shape[0], now.shape[1]]}
            write_patch(folder / PATCH_FILE, tables, specs, self.lineage(), str(self.base.resolve()))

        return write

    def lineage(self) -> Lineage:
        """The base's lineage (tensor hashes), computed once and cached beside the run's checkpoints."""
        if self._lineage is None:
            self._lineage = cached_lineage(self.base, self.cache)
        return self._lineage

    # ------------------------------------------------------------------ resume (every rank)

    def restore_files(self, folder: Path) -> None:
        from safetensors import safe_open

        opt_file = folder / ROW_OPTIMIZER_FILE
        if not opt_file.is_file():
            raise CheckpointError(f"{opt_file}: missing (not a sparse-finetuning checkpoint?)")
        if is_sparse_checkpoint(folder):
            self._restore_patch(folder / PATCH_FILE)
        with safe_open(str(opt_file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        try:
            self.optimizer.load_state_tensors(tensors, meta)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{opt_file}: unusable row-optimizer state ({e})") from None

    def _restore_patch(self, path: Path) -> None:
        patch = read_patch(path)
        ok = 1.0
        if not dist.is_initialized() or dist.get_rank() == 0:  # one rank hashes the base; all agree
            ok = float(self.base is not None and patch.base.digest == self.lineage().digest)
        if all_reduce_sum(torch.tensor([ok], dtype=torch.float64)).item() < _world():
            raise CheckpointError(
                f"{path}: made on base {patch.meta.get('base')}, not on checkpoint.initial_load_path "
                f"{self.base} (another model); refusing to resume"
            )
        by_fqn = {fqn: name for name, fqn in self.fqn.items()}
        tables = {fqn: self.optimizer.tables[name].data for fqn, name in by_fqn.items()}
        if set(patch.tables) != set(tables):
            raise CheckpointError(
                f"{path}: patches tables {sorted(patch.tables)}, the model has {sorted(tables)}"
            )
        apply_rows(
            tables, own_columns(patch, {fqn: self.optimizer.tables[n] for fqn, n in by_fqn.items()}), path
        )
        for fqn, name in by_fqn.items():
            self.optimizer.restore_changed_rows(
                name, patch.tensors[f"rows/{fqn}"], patch.tensors[f"base/{fqn}"]
            )


def own_columns(patch: Patch, tables: dict[str, torch.Tensor]) -> Patch:
    """The patch as this rank sees it: whole rows cut to its columns of each memory-parallel table."""
    tensors = dict(patch.tensors)
    for fqn, table in tables.items():
        shard = column_shard_of(table)
        if shard is None:
            continue
        for side in ("base", "finetuned"):
            key = f"{side}/{fqn}"
            tensors[key] = shard.columns_of(tensors[key])
    return dataclasses.replace(patch, tensors=tensors)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def lineage_of(path: Path) -> Lineage:
    """Lineage of a full checkpoint (tensor hashes or sidecar) or of a sparse one (its base's + its patch)."""
    if not is_sparse_checkpoint(path):
        return read_lineage(open_dcp(path))
    patch = read_patch(Path(path) / PATCH_FILE)
    return after(lineage_of(Path(patch.meta["base"])), patch, remove=False)


def cached_lineage(base: Path, cache_dir: Path) -> Lineage:
    """`read_lineage(base)`, cached in `cache_dir` and reused while the base's files are unchanged (hashing
    a 1B checkpoint reads all of it once)."""
    stamp = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in base.iterdir() if p.is_file())
    cache = cache_dir / "base_lineage.json"
    key = {"path": str(base.resolve()), "stamp": stamp}
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return Lineage(root=dict(data["root"]), applied=list(data["applied"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # recompute
    lineage = lineage_of(base)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "root": lineage.root, "applied": lineage.applied}))
    tmp.replace(cache)
    return lineage


def load_model_weights(
    manager: CheckpointManager, path: Path, model: nn.Module, allow_missing: set[str] = frozenset()
) -> None:
    """Model weights of any checkpoint: a full one directly; a sparse one as its base (recorded in the
    patch, loaded the same way, so patches on patches resolve) with the patched rows put in, each row
    checked bit for bit to hold the base value first."""
    path = Path(path)
    if not is_sparse_checkpoint(path):
        manager.load_model_only(path, model, allow_missing)
        return
    patch = read_patch(path / PATCH_FILE)
    load_model_weights(manager, Path(patch.meta["base"]), model, allow_missing)
    params = dict(model.named_parameters())
    missing = sorted(set(patch.tables) - set(params))
    if missing:
        raise CheckpointError(f"{path}: patches tables this model lacks: {', '.join(missing)}")
    full = {}
    for fqn in patch.tables:
        p = params[fqn]
        shard = column_shard_of(p)
        if shard is not None:  # memory-parallel: whole rows from every rank's columns
            full[fqn] = shard.gather_columns(p.data.detach()).clone()
        else:
            full[fqn] = (p.full_tensor() if hasattr(p, "full_tensor") else p.data).detach().clone()
    apply_rows(full, patch, path)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
