"""Reading DCP checkpoints without running code from them.

DCP stores two things as pickles: the folder's `.metadata` index (`pickle.load`) and every non-tensor value
(`torch.load(weights_only=False)`: optimizer hyperparameters, schedule counters, our per-rank state). A
crafted checkpoint could therefore execute a payload when a run resumes from it. Here:

* `.metadata` is unpickled by `MetadataUnpickler`, which resolves only the classes a DCP index is made of
  (torch.distributed.checkpoint.metadata, torch.Size, dtypes, layouts, paths) and refuses any other global;
* non-tensor values load with `torch.load(weights_only=True)`: plain containers, numbers, strings, bytes
  and tensors, nothing callable;
* our own per-rank state is JSON (`encode_state` / `decode_state`), never a pickle.

What is refused raises `UnsafeCheckpointError`, one line naming the file or key.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from titan_mem.errors import CheckpointError

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)  # every class there is a plain dataclass
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding something that would run code (or is not plain data) when loaded."""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a function or class outside the allowed ones (what a code-running payload needs)."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` index; any global outside the index's own classes is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or module in _METADATA_MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise RefusedGlobal(f"refusing global {module}.{name}")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # as FileSystemReader.read_metadata (torch 2.13)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = MetadataUnpickler(stream).load()
            except RefusedGlobal as e:
                raise UnsafeCheckpointError(f"{path}: not loaded, it could run code ({e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointError(f"'{key}': not loaded, not plain data ({first})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], obj)
        else:
            self.state_dict[key] = obj


def safe_load(states: dict[str, Any], path: str, **kwargs: Any) -> None:
    """`dcp.load` of `path` that never unpickles code (see the module docstring)."""
    dcp.load(states, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), **kwargs)


# ------------------------------------------------------------------------------------------ per-rank state

_TAG = "__titan_mem__"  # marks a value JSON has no type for


def _encode(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and _TAG not in x:
            return {k: _encode(v, f"{where}.{k}") for k, v in x.items()}
        return {
            _TAG: "dict",
            "items": [[_encode(k, where), _encode(v, f"{where}.{k}")] for k, v in x.items()],
        }
    if isinstance(x, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, bytes):
        return {_TAG: "bytes", "b64": base64.b64encode(x).decode()}
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        return {_TAG: "tensor", "dtype": dtype, "shape": list(t.shape), "b64": base64.b64encode(raw).decode()}
    raise TypeError(f"per-rank state {where}: {type(x).__name__} has no JSON form")


def _decode(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    kind = x.get(_TAG)
    if kind is None:
        return {k: _decode(v) for k, v in x.items()}
    if kind == "dict":
        return {_decode(k): _decode(v) for k, v in x["items"]}
    if kind == "tuple":
        return tuple(_decode(v) for v in x["items"])
    if kind == "bytes":
        return base64.b64decode(x["b64"])
    if kind == "tensor":
        dtype = getattr(torch, x["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {x['dtype']!r}")
        raw = bytearray(base64.b64decode(x["b64"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(x["shape"]).clone()
    raise ValueError(f"unknown tag {kind!r}")


def encode_state(state: Any) -> bytes:
    """JSON bytes of nested dicts/lists/tuples of numbers, strings, bytes and tensors (types kept)."""
    return json.dumps(_encode(state, "")).encode()


def decode_state(data: Any, where: str) -> Any:
    """Inverse of `encode_state`; anything else (a pickle from an older titan_mem or another tool) is refused
    with one line naming `where`."""
    if not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"{where}: expected JSON bytes, found {type(data).__name__}")
    try:
        return _decode(json.loads(data.decode()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UnsafeCheckpointError(
            f"{where}: not titan_mem's JSON per-rank state ({type(e).__name__}); a pickle (saved by "
            "titan_mem before 2026-11-23, or by another tool) is never unpickled -- start a new run from the "
            "weights with checkpoint.initial_load_path"
        ) from None
