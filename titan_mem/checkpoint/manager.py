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

from titan_mem.checkpoint.dcp_index import check_data_files, read_metadata
from titan_mem.checkpoint.safe_dcp import UnsafeCheckpointError, decode_state, encode_state, safe_load
from titan_mem.distributed import barrier
from titan_mem.errors import CheckpointError, root_cause, write_failure
from titan_mem.parallel.memory_parallel import optimizer_state_local, optimizer_state_view

_STEP_DIR = re.compile(r"^step-(\d+)$")
_UNFINISHED = re.compile(r"^step-\d+\.(partial|deleting)$")


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
    bytes (safe_dcp.encode_state): never a pickle, so loading one cannot run code.

    `put` receives the list of saved rank states: this rank's alone when the world size is unchanged, every
    saved rank's after a resize (`expect_saved_world`), so the data position can be redistributed."""

    def __init__(self, rank: int, world_size: int, get: Any, put: Any):
        self.rank, self.world_size, self.get, self.put = rank, world_size, get, put
        self.saved_world = world_size

    def expect_saved_world(self, saved_world: int) -> None:
        self.saved_world = saved_world

    def _keys(self) -> list[str]:
        if self.saved_world == self.world_size:
            return [f"rank{self.rank}"]
        return [f"rank{r}" for r in range(self.saved_world)]

    def state_dict(self) -> dict[str, Any]:
        if self.saved_world != self.world_size:  # a template for loading another world's keys
            return dict.fromkeys(self._keys(), b"")
        return {f"rank{self.rank}": encode_state(self.get())}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.put([decode_state(sd[key], f"rank_state.{key}") for key in self._keys()])
        self.saved_world = self.world_size


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


def check_resume_world_size(path: Path, saved: int, now: int, regime: str) -> None:
    """A pretraining position moves to any rank count (data/streams.py); a finetuning one is per rank."""
    if saved != now and regime != "pretrain":
        raise CheckpointError(
            f"{path}: saved with {saved} data-parallel ranks, resuming with {now}; a data.regime={regime} "
            "position is per rank (use the same world size, or start a new run from it with "
            "checkpoint.initial_load_path)"
        )


class _DieBeforeMetadata(FileSystemWriter):
    """Test fault: SIGKILL once the tensor files are written, before DCP writes `.metadata`."""

    def finish(self, metadata: Any, results: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    def __init__(
        self,
        folder: Path,
        *,
        rank: int,
        dp_world_size: int,
        keep_latest_k: int,
        enabled: bool = True,
        regime: str = "pretrain",
        async_save: bool = False,
    ):
        self.folder, self.rank, self.dp_world_size, self.regime = folder, rank, dp_world_size, regime
        self._pending: tuple[Any, Path, Path] | None = None
        # Background writes get their own gloo group: collectives from the writer thread must not interleave
        # with the training thread's on the default group. Created on every rank (a collective call).
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.keep_latest_k, self.enabled = keep_latest_k, enabled

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        states: dict[str, Stateful],
        extra: dict[str, Any],
        write_files: Callable[[Path], None] | None = None,
        *,
        asynchronous: bool = False,
    ) -> Path:
        """Write all `states` for `step` (and rank 0's `write_files(partial_folder)`); atomic by
        write-then-rename. `asynchronous`: return once the state is copied to CPU memory; the files are
        written in the background and committed by the next `save` or `wait`."""
        self.wait()  # one save in flight at most, committed in order
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self.rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        barrier()
        train_state = {"step": step, "dp_world_size": self.dp_world_size, "extra": json.dumps(extra)}
        content = {**states, "train_state": train_state}
        if self.rank == 0 and write_files is not None:
            write_files(partial)  # now: these files hold this step's state, not a later one
        if asynchronous:
            if self._async_group is None:
                raise CheckpointError(
                    "checkpoint: asynchronous saves need CheckpointManager(async_save=True)"
                )
            future = dcp.async_save(content, checkpoint_id=str(partial), process_group=self._async_group)
            self._pending = (future, partial, final)
            return final
        fault = os.environ.get("TITAN_MEM_TEST_KILL_IN_SAVE")  # fault injection for the crash-safety test
        writer = _DieBeforeMetadata(str(partial)) if fault == "before_metadata" else None
        try:
            dcp.save(content, checkpoint_id=str(partial), storage_writer=writer)
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise self._save_failed(partial, f"saving step {step}", e) from None
        if fault == "before_rename":  # everything written, nothing committed
            os.kill(os.getpid(), signal.SIGKILL)
        self._commit(partial, final)
        return final

    def wait(self) -> None:
        """Finish and commit an asynchronous save in flight (a no-op when there is none)."""
        if self._pending is None:
            return
        future, partial, final = self._pending
        self._pending = None
        try:
            future.result()  # the writer thread's error, raised here in the training thread
        except BaseException as e:
            raise self._save_failed(partial, f"saving {final.name} in the background", e) from None
        self._commit(partial, final)

    def _save_failed(self, partial: Path, what: str, e: BaseException) -> CheckpointError:
        """The one-line error for a failed save; rank 0 removes the unfinished folder (never loaded, and
        it holds the space a full disk needs back)."""
        error = write_failure(partial, what, e)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        return error

    def _commit(self, partial: Path, final: Path) -> None:
        barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._purge()
        barrier()

    def remove_unfinished(self) -> list[Path]:
        """Delete what a crash left half-done: `step-N.partial/` (a save, never complete, never loaded),
        `step-N.deleting/` (a purge) and `step-N/` without `.metadata` (deleted by an older titan_mem
        in place). Up to a whole checkpoint of disk each. Call only while holding the run lock."""
        removed = []
        if self.folder.is_dir():
            for p in sorted(self.folder.iterdir()):
                half_deleted = _STEP_DIR.match(p.name) and not (p / ".metadata").exists()
                if p.is_dir() and (_UNFINISHED.match(p.name) or half_deleted):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        steps = sorted(step_dirs(self.folder))
        for s in steps[: -self.keep_latest_k]:
            # rename first (atomic), so a crash mid-delete leaves a name the next start removes
            doomed = self.folder / f"step-{s}.deleting"
            os.replace(self.folder / f"step-{s}", doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def resume_path(self, load_step: int) -> Path | None:
        return resume_path(self.folder, load_step)

    def load_full(self, path: Path, model: torch.nn.Module, states: dict[str, Stateful]) -> dict[str, Any]:
        """Restore everything saved at `path`; returns the train state (step, extra)."""
        check_data_files(path)  # once per load, not per DCP read: every rank stats every shard
        if "model" in states:
            check_model_compatible(path, model)
        train_state = {"step": 0, "dp_world_size": 0, "extra": ""}
        self._load({"train_state": train_state}, path)
        saved_world = int(train_state["dp_world_size"])
        check_resume_world_size(path, saved_world, self.dp_world_size, self.regime)
        for state in states.values():
            if isinstance(state, RankState):
                state.expect_saved_world(saved_world)
        self._load(states, path)
        return {"step": int(train_state["step"]), "extra": json.loads(train_state["extra"] or "{}")}

    def load_model_only(
        self, path: Path, model: torch.nn.Module, allow_missing: set[str] = frozenset()
    ) -> None:
        """Load only the model weights (the start of a finetuning run or an evaluation)."""
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found")
        check_data_files(path)
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
