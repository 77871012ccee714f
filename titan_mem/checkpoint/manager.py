"""DCP checkpoints in `<run>/<folder>/step-N/`: model, optimizer, lr schedule, step, per-rank loader + RNG.

A save is written to `step-N.partial/` and renamed to `step-N/` by rank 0 only after every rank finished,
so a crash mid-save leaves the previous checkpoint the newest usable one (a rename is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from titan_mem.checkpoint.dcp_index import read_metadata
from titan_mem.checkpoint.errors import CheckpointError, root_cause
from titan_mem.checkpoint.safe_dcp import UnsafeCheckpointError, decode_state, encode_state, safe_load
from titan_mem.distributed import barrier
from titan_mem.parallel.memory_parallel import optimizer_state_local, optimizer_state_view

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelState(Stateful):
    """Model weights; `skip` names tensors not to load (e.g. fresh LoRA adapters absent from the file)."""

    def __init__(self, model: torch.nn.Module, strict: bool = True, skip: set[str] = frozenset()):
        self.model, self.strict, self.skip = model, strict, skip

    def state_dict(self) -> dict[str, Any]:
        sd = get_model_state_dict(self.model)
        return {k: v for k, v in sd.items() if k not in self.skip} if self.skip else sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd, options=StateDictOptions(strict=self.strict))


class OptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state_view(self.model, get_optimizer_state_dict(self.model, self.optimizer))

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state_local(self.model, sd))


class SchedulerState(Stateful):
    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        sd = self.scheduler.state_dict()
        return {k: v for k, v in sd.items() if k != "lr_lambdas"}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **sd})


class RankState(Stateful):
    """Objects that differ per rank (data loader position, RNG), stored under a rank-specific key as JSON
    bytes (safe_dcp.encode_state): never a pickle, so loading one cannot run code."""

    def __init__(self, rank: int, get: Any, put: Any):
        self.key, self.get, self.put = f"rank{rank}", get, put

    def state_dict(self) -> dict[str, Any]:
        return {self.key: encode_state(self.get())}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.put(decode_state(sd[self.key], f"rank_state.{self.key}"))


def step_dirs(folder: Path) -> dict[int, Path]:
    """Complete checkpoints (those with DCP's .metadata) by step."""
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / ".metadata").is_file():
                found[int(m.group(1))] = p
    return found


def resume_path(folder: Path, load_step: int) -> Path | None:
    """The checkpoint a run in `folder` resumes from: `load_step`, or the newest complete one, or None."""
    found = step_dirs(folder)
    if load_step >= 0:
        if load_step not in found:
            raise CheckpointError(
                f"checkpoint.load_step={load_step}: no complete checkpoint {folder}/step-{load_step}"
            )
        return found[load_step]
    return found[max(found)] if found else None


def check_model_compatible(path: Path, model: torch.nn.Module, allow_missing: set[str] = frozenset()) -> None:
    """Refuse a checkpoint whose model tensors do not match this model by name and global shape."""
    saved = read_metadata(path).state_dict_metadata
    expected = get_model_state_dict(model)
    for name, tensor in expected.items():
        key = f"model.{name}"
        if key not in saved:
            if name in allow_missing:
                continue
            raise CheckpointError(f"{path}: has no tensor '{name}' (a checkpoint of a different model?)")
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: '{name}' has shape {shape} but this model expects {tuple(tensor.shape)}"
            )
    extra = sorted(k[len("model.") :] for k in saved if k.startswith("model.") and k[6:] not in expected)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        hint = (
            " (merge LoRA first: tools/convert_checkpoint.py export-model --merge-lora)"
            if any("lora_" in n for n in extra)
            else " (a checkpoint of a different model?)"
        )
        raise CheckpointError(f"{path}: has tensors this model lacks: {', '.join(extra[:3])}{more}{hint}")


def check_resume_world_size(path: Path, saved: int, now: int) -> None:
    """The data loader position is per rank: a resume must keep the data-parallel degree."""
    if saved != now:
        raise CheckpointError(
            f"{path}: saved with {saved} data-parallel ranks, resuming with {now}; the data loader position "
            "cannot be mapped (use the same world size, or start a new run from it with "
            "checkpoint.initial_load_path)"
        )


class _DieBeforeMetadata(FileSystemWriter):
    """Test fault: SIGKILL once the tensor files are written, before DCP writes `.metadata`."""

    def finish(self, metadata: Any, results: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    def __init__(
        self, folder: Path, *, rank: int, dp_world_size: int, keep_latest_k: int, enabled: bool = True
    ):
        self.folder, self.rank, self.dp_world_size = folder, rank, dp_world_size
        self.keep_latest_k, self.enabled = keep_latest_k, enabled

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        states: dict[str, Stateful],
        extra: dict[str, Any],
        write_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write all `states` for `step` (and rank 0's `write_files(partial_folder)`); atomic by
        write-then-rename."""
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        barrier()
        train_state = {"step": step, "dp_world_size": self.dp_world_size, "extra": json.dumps(extra)}
        fault = os.environ.get("TITAN_MEM_TEST_KILL_IN_SAVE")  # fault injection for the crash-safety test
        writer = _DieBeforeMetadata(str(partial)) if fault == "before_metadata" else None
        dcp.save({**states, "train_state": train_state}, checkpoint_id=str(partial), storage_writer=writer)
        if self.rank == 0 and write_files is not None:
            write_files(partial)
        if fault == "before_rename":  # everything written, nothing committed
            os.kill(os.getpid(), signal.SIGKILL)
        barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._purge()
        barrier()
        return final

    def remove_partial_saves(self) -> list[Path]:
        """Delete `step-N.partial/` folders: saves a crash interrupted (never complete, never loaded; up to
        a whole checkpoint of disk each). Call only while holding the run lock."""
        removed = []
        if self.folder.is_dir():
            for p in sorted(self.folder.glob("step-*.partial")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        steps = sorted(step_dirs(self.folder))
        for s in steps[: -self.keep_latest_k]:
            shutil.rmtree(self.folder / f"step-{s}", ignore_errors=True)

    # ------------------------------------------------------------------ load

    def resume_path(self, load_step: int) -> Path | None:
        return resume_path(self.folder, load_step)

    def load_full(self, path: Path, model: torch.nn.Module, states: dict[str, Stateful]) -> dict[str, Any]:
        """Restore everything saved at `path`; returns the train state (step, extra)."""
        if "model" in states:
            check_model_compatible(path, model)
        train_state = {"step": 0, "dp_world_size": 0, "extra": ""}
        self._load({"train_state": train_state}, path)
        check_resume_world_size(path, int(train_state["dp_world_size"]), self.dp_world_size)
        self._load(states, path)
        return {"step": int(train_state["step"]), "extra": json.loads(train_state["extra"] or "{}")}

    def load_model_only(
        self, path: Path, model: torch.nn.Module, allow_missing: set[str] = frozenset()
    ) -> None:
        """Load only the model weights (the start of a finetuning run or an evaluation)."""
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found")
        check_model_compatible(path, model, allow_missing)
        self._load({"model": ModelState(model, strict=not allow_missing, skip=set(allow_missing))}, path)

    def _load(self, states: dict[str, Any], path: Path) -> None:
        try:
            safe_load(states, str(path))
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            msg = root_cause(e)
            if "UnsafeCheckpointError" in msg:  # raised on a rank inside DCP, wrapped by it
                raise UnsafeCheckpointError(f"{path}: {msg.split(': ', 1)[1]}") from None
            raise CheckpointError(f"{path}: failed to load ({msg})") from None


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
