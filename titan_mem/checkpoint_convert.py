"""Checkpoint conversion: DCP <-> one consolidated file, model-only exports, sparse finetuning deltas.

Why each piece exists:

* `to_file` / `to_dcp`: a DCP folder is many files plus a pickled index; sharing, inspecting or loading a
  checkpoint outside the trainer wants one file. `.pt` keeps the whole nested state (model, optimizer,
  schedule, per-rank bytes, train state) and loads with `torch.load(weights_only=True)`, so `to_dcp` gives
  back the same flattened keys and values. `.safetensors` holds only the model, keyed by the model's own
  FQNs (`layers.0.attention.wq.weight`, no `model.` prefix), which is what other tools expect.
* `export_model`: a finetuning run starts from model weights only; with `merge_lora` the adapters are
  folded into the base weights so the result loads into a plain model.
* `make_delta` / `apply_delta`: sparse memory finetuning changes a few value rows; storing those rows (new
  and old) instead of a whole checkpoint makes a finetune a small file that can be applied to its base or
  removed from the finetuned checkpoint, bit for bit. Every model tensor's sha256 is recorded so a delta is
  never applied to a checkpoint it was not made from.

Reading needs no process group (`no_dist=True`); every write goes to `<out>.partial` / `<out>.tmp` and is
renamed into place only when complete. Problems raise `ConvertError` with a one-line `<path>: <what>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from titan_mem.checkpoint import CheckpointError, read_metadata, root_cause
from titan_mem.models.lora import merge_lora_state_dict

MODEL_KEY = "model"
VALUE_SUFFIX = "values.weight"  # memory value tables: `layers.N.feed_forward.values.weight`, shared pools
DELTA_FORMAT = "titan_mem.sparse_delta"
DELTA_VERSION = "1"
FILE_SUFFIXES = (".pt", ".safetensors")
# Tensors read per batch while streaming two checkpoints side by side (delta): bounds peak memory.
STREAM_BYTES = 1 << 30


class ConvertError(CheckpointError):
    """An input or output the conversion cannot use; `str()` is one line `<path>: <what>`."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(f"{path}: {what}")


# ---------------------------------------------------------------------------------------------- reading


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
    _check_data_files(path, md)
    planner_data = md.planner_data if isinstance(md.planner_data, dict) else {}
    paths = {k: tuple(planner_data.get(k, (k,))) for k in md.state_dict_metadata}
    return DcpIndex(path, md, paths)


def _check_data_files(path: Path, md: Metadata) -> None:
    """A missing or truncated data file is named here, not deep inside a DCP read."""
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
        with _single_process():
            dcp.load(
                state,
                storage_reader=dcp.FileSystemReader(str(index.path)),
                planner=DefaultLoadPlanner(),
                no_dist=True,
            )
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
def _single_process() -> Iterator[None]:
    """DCP warns on every `no_dist` call that no process group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---------------------------------------------------------------------------------------------- writing


def _check_new_output(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    for src in inputs:
        if out.resolve() == src.resolve():
            raise ConvertError(out, "is also an input; write to a new path")
    if out.exists() and not overwrite:
        raise ConvertError(out, "already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield `<out>.partial` to write into; it becomes `out` only if the block finishes."""
    _check_new_output(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    _remove(partial)  # a stale one from a killed run
    try:
        yield partial
        if out.exists():
            old = out.with_name(out.name + ".old")
            _remove(old)
            os.replace(out, old)
            os.replace(partial, out)
            _remove(old)
        else:
            os.replace(partial, out)
    except BaseException:
        _remove(partial)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield `<out>.tmp` to write; it replaces `out` (atomically) only if the block finishes."""
    _check_new_output(out, overwrite, inputs)
    if out.is_dir():
        raise ConvertError(out, "is a folder; expected a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def save_dcp(
    state: dict[str, Any], out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()
) -> None:
    """Write `state` as a DCP folder in one process, atomically."""
    with atomic_dir(out, overwrite, inputs) as partial:
        with _single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(partial)), no_dist=True)


def _file_kind(path: Path) -> str:
    if path.suffix not in FILE_SUFFIXES:
        raise ConvertError(path, f"unknown extension '{path.suffix}' (expected {' or '.join(FILE_SUFFIXES)})")
    return path.suffix[1:]


# ---------------------------------------------------------------------------------------------- DCP <-> file

_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None))


def _check_weights_only(obj: Any, where: str, path: Path) -> None:
    """Refuse what `torch.load(weights_only=True)` could not read back, before writing anything."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_weights_only(v, f"{where}.{k}" if where else str(k), path)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}.{i}", path)
    elif not isinstance(obj, _PLAIN):
        raise ConvertError(path, f"entry '{where}' is a {type(obj).__name__}, not loadable with weights_only")


def to_file(
    dcp_dir: str | os.PathLike, out: str | os.PathLike, model_only: bool = False, overwrite: bool = False
) -> str:
    """Consolidate a DCP folder into one `.pt` (nested state) or `.safetensors` (model tensors) file."""
    out, kind = Path(out), _file_kind(Path(out))
    _check_new_output(out, overwrite, (Path(dcp_dir),))
    index = open_dcp(dcp_dir)
    if kind == "safetensors":
        from safetensors.torch import save_file

        model = load_model(index)
        meta = {"titan_mem": "model", "source": str(index.path.resolve())}
        train_keys = [k for k, p in index.paths.items() if p[0] == "train_state"]
        if train_keys:
            meta["train_state"] = json.dumps(
                load_nested(index, train_keys).get("train_state", {}), default=str
            )
        with atomic_file(out, overwrite, (index.path,)) as tmp:
            save_file({k: v.contiguous() for k, v in model.items()}, str(tmp), metadata=meta)
        return f"wrote {out}: {len(model)} model tensors, {_nbytes(model.values()) / 2**20:.1f} MiB"
    if model_only:
        keys = list(index.model_tensors().values())
        if not keys:
            raise ConvertError(index.path, "has no model tensors (no 'model.*' keys)")
        state = load_nested(index, keys)
    else:
        state = load_nested(index)
    _check_weights_only(state, "", index.path)
    with atomic_file(out, overwrite, (index.path,)) as tmp:
        torch.save(state, tmp)
    n = len(index.model_tensors()) if model_only else len(index.metadata.state_dict_metadata)
    return f"wrote {out}: {n} entries ({'model only' if model_only else 'full state'})"


def read_file(src: str | os.PathLike) -> dict[str, Any]:
    """A consolidated file as the nested state to save as DCP (`.safetensors` -> {"model": tensors})."""
    src = Path(src)
    kind = _file_kind(src)
    if not src.exists():
        raise ConvertError(src, "not found")
    if not src.is_file():
        raise ConvertError(src, "not a file")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(src))
        except Exception as e:  # SafetensorError for a bad header, OSError, ...
            raise ConvertError(src, f"not a readable safetensors file ({root_cause(e)})") from None
        if not tensors:
            raise ConvertError(src, "holds no tensors")
        return {MODEL_KEY: tensors}
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors for corrupt files, UnpicklingError for foreign objects
        raise ConvertError(src, f"not a loadable torch file ({root_cause(e)})") from None
    if not isinstance(state, dict):
        raise ConvertError(src, f"holds a {type(state).__name__}, expected a dict")
    if MODEL_KEY not in state:
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return {MODEL_KEY: state}  # a plain model state dict
        raise ConvertError(src, "has no 'model' entry (expected a file written by to-file)")
    if not isinstance(state[MODEL_KEY], dict) or not state[MODEL_KEY]:
        raise ConvertError(src, "its 'model' entry is not a non-empty dict of tensors")
    return state


def to_dcp(src: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a consolidated file back as a DCP folder (model under `model.*`, as the trainer loads it)."""
    _check_new_output(Path(out_dir), overwrite, (Path(src),))
    state = read_file(src)
    save_dcp(state, Path(out_dir), overwrite, (Path(src),))
    return f"wrote {out_dir}: {len(state[MODEL_KEY])} model tensors" + (
        f" + {', '.join(k for k in state if k != MODEL_KEY)}" if len(state) > 1 else ""
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------- export


def lora_prefixes(model: dict[str, torch.Tensor]) -> list[str]:
    """Module prefixes that carry both LoRA adapter tensors."""
    a = {k[: -len(".lora_a")] for k in model if k.endswith(".lora_a")}
    b = {k[: -len(".lora_b")] for k in model if k.endswith(".lora_b")}
    return sorted(a | b)


def merge_lora(model: dict[str, torch.Tensor], alpha: float, path: Path) -> dict[str, torch.Tensor]:
    """Fold every adapter into its weight with scale alpha / r, r read from the adapter's shape."""
    prefixes = lora_prefixes(model)
    if not prefixes:
        raise ConvertError(path, "has no LoRA adapters ('*.lora_a' / '*.lora_b') to merge")
    scales = {}
    for p in prefixes:
        a, b, w = model.get(f"{p}.lora_a"), model.get(f"{p}.lora_b"), model.get(f"{p}.weight")
        if a is None or b is None or w is None:
            raise ConvertError(path, f"'{p}' lacks one of lora_a / lora_b / weight")
        r = a.shape[0]
        if (
            a.ndim != 2
            or b.ndim != 2
            or w.ndim != 2
            or b.shape[1] != r
            or w.shape != (b.shape[0], a.shape[1])
        ):
            raise ConvertError(
                path,
                f"'{p}': adapter shapes lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)} do not fit weight "
                f"{tuple(w.shape)}",
            )
        scales[p] = alpha / r
    return merge_lora_state_dict(model, scales)


def export_model(
    dcp_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    merge: bool = False,
    lora_alpha: float | None = None,
    overwrite: bool = False,
) -> str:
    """A model-only DCP folder (optionally LoRA-merged): the start of a finetuning run or an evaluation."""
    _check_new_output(Path(out_dir), overwrite, (Path(dcp_dir),))
    if merge and lora_alpha is None:
        raise ConvertError(dcp_dir, "--merge-lora needs --lora-alpha (the run's finetune.lora_alpha)")
    index = open_dcp(dcp_dir)
    model = load_model(index)
    note = ""
    if merge:
        n = len(lora_prefixes(model))
        model = merge_lora(model, lora_alpha, index.path)
        note = f", merged {n} LoRA adapters"
    save_dcp({MODEL_KEY: model}, Path(out_dir), overwrite, (index.path,))
    return f"wrote {out_dir}: {len(model)} model tensors{note}"


# ---------------------------------------------------------------------------------------------- deltas


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view with one element per value, so comparisons are bitwise (NaN, -0.0 included)."""
    t = t.contiguous().reshape(t.shape[0] if t.ndim else 1, -1)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return t.view(as_int) if as_int is not None and t.dtype != as_int else t.view(torch.uint8)


def sha256(t: torch.Tensor) -> str:
    """Digest of a tensor's bytes (shape and dtype are checked separately)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def changed_rows(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Sorted ids of rows that differ in any bit."""
    return torch.ne(_bits(finetuned), _bits(base)).any(1).nonzero().flatten()


def _dtype(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _batches(names: list[str], sizes: dict[str, int], budget: int) -> Iterator[list[str]]:
    batch, used = [], 0
    for n in names:
        if batch and used + sizes[n] > budget:
            yield batch
            batch, used = [], 0
        batch.append(n)
        used += sizes[n]
    if batch:
        yield batch


@dataclass
class DeltaSummary:
    rows: dict[str, int]
    table_rows: dict[str, int]
    dense: list[str]
    nbytes: int

    def line(self, out: Path) -> str:
        per = ", ".join(f"{k}: {n}/{self.table_rows[k]} rows" for k, n in self.rows.items())
        dense = f"; dense: {', '.join(self.dense)}" if self.dense else ""
        return f"wrote {out}: {per}{dense} ({self.nbytes / 2**20:.2f} MiB)"


def make_delta(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    allow_dense: bool = False,
    overwrite: bool = False,
    stream_bytes: int = STREAM_BYTES,
) -> DeltaSummary:
    """The changed value rows of `finetuned` against `base` (both sides), as a safetensors file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConvertError(out, f"unknown extension '{out.suffix}' (a delta is a .safetensors file)")
    _check_new_output(out, overwrite, (Path(finetuned), Path(base)))
    ft_idx, base_idx = open_dcp(finetuned), open_dcp(base)
    ft_names, base_names = ft_idx.model_tensors(), base_idx.model_tensors()
    if not ft_names:
        raise ConvertError(ft_idx.path, "has no model tensors (no 'model.*' keys)")
    _same_names(ft_idx.path, set(ft_names), set(base_names), "the base")
    for name in ft_names:
        f, b = ft_idx.tensor_meta(ft_names[name]), base_idx.tensor_meta(base_names[name])
        if tuple(f.size) != tuple(b.size) or f.properties.dtype != b.properties.dtype:
            raise ConvertError(
                ft_idx.path,
                f"'{name}' is {tuple(f.size)} {f.properties.dtype} but the base has {tuple(b.size)} "
                f"{b.properties.dtype}",
            )
    tables = sorted(n for n in ft_names if n.endswith(VALUE_SUFFIX))
    if not tables:
        raise ConvertError(ft_idx.path, f"has no memory value tables ('*{VALUE_SUFFIX}')")
    for t in tables:
        if len(ft_idx.tensor_meta(ft_names[t]).size) < 2:
            raise ConvertError(ft_idx.path, f"value table '{t}' is not 2-D")

    sizes = {n: _nbytes([_empty_like_meta(ft_idx.tensor_meta(ft_names[n]))]) for n in ft_names}
    tensors: dict[str, torch.Tensor] = {}
    table_meta, dense_meta, same_meta = {}, {}, {}
    differing: list[str] = []
    for batch in _batches(sorted(ft_names), sizes, stream_bytes):
        fts = load_flat(ft_idx, [ft_names[n] for n in batch])
        bases = load_flat(base_idx, [base_names[n] for n in batch])
        for n in batch:
            f, b = fts[ft_names[n]], bases[base_names[n]]
            if n in tables:
                rows = changed_rows(f, b)
                tensors[f"rows/{n}"] = rows
                tensors[f"finetuned/{n}"] = f[rows].contiguous()
                tensors[f"base/{n}"] = b[rows].contiguous()
                table_meta[n] = {
                    **_spec(f),
                    "rows": rows.numel(),
                    "base_sha256": sha256(b),
                    "finetuned_sha256": sha256(f),
                }
            elif torch.equal(_bits(f), _bits(b)):
                same_meta[n] = {**_spec(b), "sha256": sha256(b)}
            else:
                differing.append(n)
                if allow_dense:
                    tensors[f"dense_finetuned/{n}"] = f.contiguous()
                    tensors[f"dense_base/{n}"] = b.contiguous()
                    dense_meta[n] = {**_spec(f), "base_sha256": sha256(b), "finetuned_sha256": sha256(f)}
        del fts, bases
    if differing and not allow_dense:
        shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise ConvertError(
            ft_idx.path,
            f"{len(differing)} non-value tensor(s) differ from the base ({shown}): not a sparse finetune "
            "(pass --allow-dense to store them whole)",
        )
    meta = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "base": str(base_idx.path.resolve()),
        "finetuned": str(ft_idx.path.resolve()),
        "rows": json.dumps({n: m["rows"] for n, m in table_meta.items()}),
        "tables": json.dumps(table_meta),
        "dense": json.dumps(dense_meta),
        "unchanged": json.dumps(same_meta),
    }
    from safetensors.torch import save_file

    with atomic_file(out, overwrite, (ft_idx.path, base_idx.path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return DeltaSummary(
        rows={n: m["rows"] for n, m in table_meta.items()},
        table_rows={n: m["shape"][0] for n, m in table_meta.items()},
        dense=sorted(dense_meta),
        nbytes=out.stat().st_size,
    )


def _empty_like_meta(md: TensorStorageMetadata) -> torch.Tensor:
    return torch.empty(md.size, dtype=md.properties.dtype, device="meta")


def _same_names(path: Path, have: set[str], other: set[str], other_name: str) -> None:
    if have == other:
        return
    parts = []
    if have - other:
        parts.append(f"only here: {', '.join(sorted(have - other)[:3])}")
    if other - have:
        parts.append(f"only in {other_name}: {', '.join(sorted(other - have)[:3])}")
    raise ConvertError(path, f"model tensors do not match {other_name}'s ({'; '.join(parts)})")


@dataclass
class Delta:
    path: Path
    meta: dict[str, str]
    tables: dict[str, dict[str, Any]]
    dense: dict[str, dict[str, Any]]
    unchanged: dict[str, dict[str, Any]]
    tensors: dict[str, torch.Tensor]


def read_delta(path: str | os.PathLike) -> Delta:
    """Load and check a delta file's structure (not yet against any checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(path, "not found")
    if path.suffix != ".safetensors":
        raise ConvertError(path, f"unknown extension '{path.suffix}' (a delta is a .safetensors file)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ConvertError(path, f"not a readable safetensors file ({root_cause(e)})") from None
    if meta.get("format") != DELTA_FORMAT:
        raise ConvertError(path, "not a titan_mem sparse delta (no 'format' metadata)")
    if meta.get("version") != DELTA_VERSION:
        raise ConvertError(path, f"delta version {meta.get('version')!r}; this tool reads {DELTA_VERSION}")
    try:
        tables, dense, unchanged = (json.loads(meta[k]) for k in ("tables", "dense", "unchanged"))
        _check_delta(path, tables, dense, unchanged, tensors)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ConvertError(path, f"damaged delta metadata ({root_cause(e)})") from None
    return Delta(path, meta, tables, dense, unchanged, tensors)


def _check_delta(
    path: Path, tables: dict, dense: dict, unchanged: dict, tensors: dict[str, torch.Tensor]
) -> None:
    """Every table/tensor entry is complete and its stored rows fit the recorded shapes."""
    for group, sha_keys in (
        (tables, ("base_sha256", "finetuned_sha256")),
        (dense, ("base_sha256", "finetuned_sha256")),
        (unchanged, ("sha256",)),
    ):
        for n, m in group.items():
            if (
                not isinstance(m["shape"], list)
                or _dtype(m["dtype"]) is None
                or not all(isinstance(m[k], str) for k in sha_keys)
            ):
                raise ValueError(f"entry '{n}' is incomplete")
    for n, m in tables.items():
        rows, fr, br = (tensors.get(f"{k}/{n}") for k in ("rows", "finetuned", "base"))
        if rows is None or fr is None or br is None:
            raise ConvertError(path, f"table '{n}' lacks its rows/finetuned/base tensors")
        shape = (rows.numel(), *m["shape"][1:])
        dtype = _dtype(m["dtype"])
        bad = rows.dtype != torch.int64 or rows.ndim != 1 or rows.numel() != m["rows"]
        bad = bad or any(tuple(t.shape) != shape or t.dtype != dtype for t in (fr, br))
        if not bad and rows.numel():
            bad = bool(rows[0] < 0 or rows[-1] >= m["shape"][0] or (rows.diff() <= 0).any())
        if bad:
            raise ConvertError(path, f"table '{n}': inconsistent delta tensors")
    for n, m in dense.items():
        for side in ("finetuned", "base"):
            t = tensors.get(f"dense_{side}/{n}")
            if t is None or list(t.shape) != m["shape"] or t.dtype != _dtype(m["dtype"]):
                raise ConvertError(path, f"dense tensor '{n}': missing or misshapen {side} values")


def apply_delta(
    src: str | os.PathLike,
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    remove: bool = False,
    overwrite: bool = False,
) -> str:
    """Base + delta -> finetuned model, or (remove) finetuned - delta -> base model; checked bit for bit."""
    _check_new_output(Path(out_dir), overwrite, (Path(src), Path(delta)))
    d = read_delta(delta)
    index = open_dcp(src)
    have, want = ("finetuned", "base") if remove else ("base", "finetuned")
    expected = {**d.tables, **d.dense, **d.unchanged}
    names = index.model_tensors()
    _same_names(index.path, set(names), set(expected), "the delta")
    for n, m in expected.items():
        md = index.tensor_meta(names[n])
        spec = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
        if spec != {"shape": m["shape"], "dtype": m["dtype"]}:
            raise ConvertError(
                index.path,
                f"'{n}' is {spec['shape']} {spec['dtype']}, the delta's is {m['shape']} {m['dtype']}",
            )
    model = load_model(index)
    for n, m in expected.items():
        digest = m.get(f"{have}_sha256", m.get("sha256"))
        if sha256(model[n]) != digest:
            raise ConvertError(
                index.path,
                f"'{n}' differs from the {have} checkpoint the delta was made from ({d.meta.get(have)}); "
                "refusing to apply",
            )
    for n in d.tables:
        rows = d.tensors[f"rows/{n}"]
        table = model[n]
        width = math.prod(table.shape[1:])
        table.view(table.shape[0], width).index_copy_(
            0, rows, d.tensors[f"{want}/{n}"].view(rows.numel(), width)
        )
    for n in d.dense:
        model[n] = d.tensors[f"dense_{want}/{n}"].clone()
    for n, m in {**d.tables, **d.dense}.items():
        if sha256(model[n]) != m[f"{want}_sha256"]:  # a self-check: the result is the recorded checkpoint
            raise ConvertError(d.path, f"'{n}': applying the delta did not reproduce the {want} tensor")
    save_dcp({MODEL_KEY: model}, Path(out_dir), overwrite, (index.path, d.path))
    rows = sum(int(m["rows"]) for m in d.tables.values())
    verb = "removed" if remove else "applied"
    return f"wrote {out_dir}: {verb} {rows} rows in {len(d.tables)} table(s), {len(d.dense)} dense tensor(s)"
