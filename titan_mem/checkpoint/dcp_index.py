"""Reading a DCP checkpoint folder without a process group and without loading what is not asked for.

`open_dcp` checks the folder (metadata readable, every data file present and long enough) before anything
is loaded, so a damaged checkpoint is named precisely; `load_flat`/`load_nested`/`load_model` then read
only the keys asked for. Used by the converters, the patch tools, preflight and the content hash.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from titan_mem.checkpoint.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError, safe_load
from titan_mem.errors import CheckpointError, ConvertError, root_cause

MODEL_KEY = "model"


def read_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of a checkpoint folder, or a one-line CheckpointError."""
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a DCP checkpoint (no .metadata)") from None
    except Exception as e:  # a truncated or foreign file: DCP raises pickle/EOF/ValueError/...
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None


@dataclass
class DcpIndex:
    """A checked DCP folder: its metadata and where each flattened key lives in the nested state."""

    path: Path
    metadata: Metadata
    paths: dict[str, tuple] = field(default_factory=dict)  # flat key -> nested path

    def model_tensors(self) -> dict[str, str]:
        """Model FQN -> flat DCP key, for every tensor saved under the top-level `model` entry."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            path = self.paths[key]
            if isinstance(md, TensorStorageMetadata) and len(path) == 2 and path[0] == MODEL_KEY:
                out[str(path[1])] = key
        return out

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        return self.metadata.state_dict_metadata[key]  # type: ignore[return-value]


def open_dcp(path: str | os.PathLike) -> DcpIndex:
    """Check that `path` is a complete DCP folder before anything is loaded from it."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(path, "not found")
    if not path.is_dir():
        raise ConvertError(path, "not a DCP checkpoint folder (it is a file)")
    if not (path / ".metadata").is_file():
        raise ConvertError(path, "not a DCP checkpoint (no .metadata)")
    try:
        md = read_metadata(path)
    except CheckpointError as e:
        raise ConvertError(path, str(e).split(": ", 1)[-1]) from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ConvertError(path / ".metadata", "not DCP metadata")
    check_data_files(path, md)
    planner_data = md.planner_data if isinstance(md.planner_data, dict) else {}
    paths = {k: tuple(planner_data.get(k, (k,))) for k in md.state_dict_metadata}
    return DcpIndex(path, md, paths)


def check_data_files(path: Path, md: Metadata | None = None) -> None:
    """A missing or truncated data file is named here, not deep inside a DCP read (an `EOFError:` on
    one rank). Only sizes are compared: cheap enough to run before every load."""
    md = read_metadata(path) if md is None else md
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    needed: dict[str, int] = {}
    for info in storage.values():
        rel, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if isinstance(rel, str) and isinstance(offset, int) and isinstance(length, int):
            needed[rel] = max(needed.get(rel, 0), offset + length)
    for rel, size in sorted(needed.items()):
        f = path / rel
        if not f.is_file():
            raise ConvertError(f, "data file missing")
        have = f.stat().st_size
        if have < size:
            raise ConvertError(f, f"truncated ({have} bytes, the metadata needs {size})")


def load_flat(index: DcpIndex, keys: list[str] | None = None) -> dict[str, Any]:
    """Flat DCP key -> value (full tensors, or the saved object) for `keys` (default all)."""
    entries = index.metadata.state_dict_metadata
    keys = list(entries) if keys is None else keys
    state: dict[str, Any] = {}
    for key in keys:
        md = entries[key]
        state[key] = (
            torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        )
    if not state:
        return state
    try:
        with single_process():
            safe_load(state, str(index.path), no_dist=True)
    except UnsafeCheckpointError as e:
        raise ConvertError(index.path, str(e).removeprefix(f"{index.path}: ")) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        raise ConvertError(index.path, f"failed to load ({root_cause(e)})") from None
    return state


def load_nested(index: DcpIndex, keys: list[str] | None = None) -> dict[str, Any]:
    """The state as the trainer saved it (nested dicts/lists), rebuilt from DCP's flattening map."""
    nested: dict[str, Any] = {}
    for key, value in load_flat(index, keys).items():
        _set_path(nested, index.paths[key], value)
    return nested


def load_model(index: DcpIndex) -> dict[str, torch.Tensor]:
    """Model FQN -> tensor."""
    names = index.model_tensors()
    if not names:
        raise ConvertError(index.path, "has no model tensors (no 'model.*' keys)")
    flat = load_flat(index, list(names.values()))
    return {fqn: flat[key] for fqn, key in names.items()}


def _set_path(root: dict, path: tuple, value: Any) -> None:
    """Place `value` at `path`, creating dicts (or lists for integer steps) on the way."""
    node: Any = root
    for step, nxt in zip(path[:-1], path[1:]):
        make = list if isinstance(nxt, int) else dict
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
            if node[step] is None:
                node[step] = make()
            node = node[step]
        else:
            node = node.setdefault(step, make())
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """DCP warns on every `no_dist` call that no process group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The small `train_state` entry (step, dp_world_size, ...) of a trainer checkpoint, nothing else."""
    index = open_dcp(path)
    keys = [k for k, p in index.paths.items() if p[0] == "train_state"]
    return load_nested(index, keys).get("train_state", {}) if keys else {}


def iter_model_batches(
    index: DcpIndex, names: list[str], budget_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Model tensors `names` in batches of at most ~`budget_bytes` (one tensor may exceed it): bounds peak
    memory when a big checkpoint is hashed or compared tensor by tensor."""
    keys = index.model_tensors()
    batch: list[str] = []
    used = 0
    for name in names:
        md = index.tensor_meta(keys[name])
        size = math.prod(md.size) * torch.empty((), dtype=md.properties.dtype).element_size()
        if batch and used + size > budget_bytes:
            flat = load_flat(index, [keys[n] for n in batch])
            yield {n: flat[keys[n]] for n in batch}
            batch, used = [], 0
        batch.append(name)
        used += size
    if batch:
        flat = load_flat(index, [keys[n] for n in batch])
        yield {n: flat[keys[n]] for n in batch}
