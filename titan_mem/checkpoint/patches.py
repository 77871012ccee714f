"""Knowledge patches: the value rows a sparse finetune changed, as one safetensors file.

A sparse memory finetune changes a few rows of the memory value tables. A *patch* stores, per table, those
rows' ids with their values before and after (`rows/T`, `base/T`, `finetuned/T`), so it can be applied to
its base or removed again, bit for bit, and several patches from one base can be stacked.

Identity (why a patch is never applied to the wrong model):
* every patch records its base's *lineage*: the sha256 of each model tensor of the root checkpoint it was
  trained from, plus the ids of the patches already applied on top of that root;
* a checkpoint written by `apply_delta` (or exported from a sparse checkpoint) carries its lineage in a
  sidecar `titan_mem_patches.json`; any other checkpoint's lineage is computed by hashing its tensors;
* applying needs the same root, every patch the new one was trained on, and, row by row, the exact values
  the patch was trained from (so two patches that changed the same rows conflict instead of mixing);
  removing needs the patch in the lineage and its rows still holding the patched values.
The patch id is the sha256 of its tensors and lineage. Problems raise `ConvertError` (one line).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_mem.checkpoint.dcp_index import MODEL_KEY, DcpIndex, iter_model_batches, load_model, open_dcp
from titan_mem.checkpoint.files import atomic_file, check_new_output, save_dcp
from titan_mem.errors import ConvertError, root_cause
from titan_mem.models.memory import is_value_table

PATCH_FORMAT = "titan_mem.sparse_delta"
PATCH_VERSION = "2"
LINEAGE_FILE = "titan_mem_patches.json"
# Tensors read per batch while hashing or comparing checkpoints: bounds peak memory.
STREAM_BYTES = 1 << 30

TensorSpecs = dict[str, dict[str, Any]]  # name -> {"shape": [...], "dtype": "float32", "sha256": hex}


# ---------------------------------------------------------------------------------------------- hashing


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view with one row per leading index, so comparisons are bitwise (NaN, -0.0 included)."""
    rows = t.shape[0] if t.ndim else 1
    t = t.contiguous().reshape(rows, t.numel() // rows if rows else 0)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return t.view(as_int) if as_int is not None and t.dtype != as_int else t.view(torch.uint8)


def sha256(t: torch.Tensor) -> str:
    """Digest of a tensor's bytes (shape and dtype are recorded beside it)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def tensor_specs(index: DcpIndex, stream_bytes: int = STREAM_BYTES) -> TensorSpecs:
    """Shape, dtype and sha256 of every model tensor of a DCP checkpoint, streamed in bounded batches."""
    names = sorted(index.model_tensors())
    if not names:
        raise ConvertError(index.path, "has no model tensors (no 'model.*' keys)")
    out: TensorSpecs = {}
    for batch in iter_model_batches(index, names, stream_bytes):
        for n, t in batch.items():
            out[n] = {**spec(t), "sha256": sha256(t)}
    return out


@dataclass
class Lineage:
    """Which model a checkpoint holds: a root checkpoint's tensors plus the patches applied on top."""

    root: TensorSpecs
    applied: list[str]

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "applied": self.applied}, sort_keys=True)

    @property
    def digest(self) -> str:
        """One hex id for the whole lineage (recorded in logs and sparse checkpoints)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def root_digest(self) -> str:
        """One hex id for the root checkpoint alone: what an exported model records, so that a patch finds
        out whether it was trained on this base (hf/remote/modeling_titan_mem.py computes the same)."""
        return hashlib.sha256(json.dumps(self.root, sort_keys=True).encode()).hexdigest()


def state_lineage(state: dict[str, torch.Tensor]) -> Lineage:
    """The lineage of an in-memory model state dict that no patch has touched (its own tensor hashes)."""
    return Lineage(root={n: {**spec(t), "sha256": sha256(t)} for n, t in sorted(state.items())}, applied=[])


def read_lineage(index: DcpIndex, stream_bytes: int = STREAM_BYTES) -> Lineage:
    """The sidecar lineage written with a patched checkpoint, else the checkpoint's own tensor hashes."""
    sidecar = index.path / LINEAGE_FILE
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
            return Lineage(root=dict(data["root"]), applied=[str(a) for a in data["applied"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(sidecar, f"damaged patch lineage ({root_cause(e)})") from None
    return Lineage(root=tensor_specs(index, stream_bytes), applied=[])


# ---------------------------------------------------------------------------------------------- the file


@dataclass
class Patch:
    path: Path
    id: str
    meta: dict[str, str]
    tables: dict[str, dict[str, Any]]  # name -> {"shape", "dtype", "rows"}
    dense: TensorSpecs  # whole tensors that changed (make_delta --allow-dense): base specs
    base: Lineage
    finetuned: TensorSpecs | None  # tensor hashes of the finetuned checkpoint, when known
    tensors: dict[str, torch.Tensor]

    @property
    def n_rows(self) -> int:
        return sum(int(m["rows"]) for m in self.tables.values())


def patch_id(tensors: dict[str, torch.Tensor], base: Lineage) -> str:
    h = hashlib.sha256(base.digest.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(sha256(tensors[name]).encode())
    return h.hexdigest()


def write_patch(
    out: Path,
    tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    table_specs: dict[str, dict[str, Any]],
    base: Lineage,
    base_path: str,
    *,
    finetuned_path: str = "",
    finetuned: TensorSpecs | None = None,
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    extra_meta: dict[str, str] | None = None,
) -> str:
    """Write `{table: (rows, base_rows, finetuned_rows)}` (+ dense {name: (base, finetuned)}) to `out`
    (an already-safe temporary path: the caller renames it). Returns the patch id."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for n, (rows, b, f) in tables.items():
        tensors[f"rows/{n}"] = rows.detach().cpu().to(torch.int64).contiguous()
        tensors[f"base/{n}"] = b.detach().cpu().contiguous()
        tensors[f"finetuned/{n}"] = f.detach().cpu().contiguous()
    dense_meta: TensorSpecs = {}
    for n, (b, f) in (dense or {}).items():
        tensors[f"dense_base/{n}"] = b.detach().cpu().contiguous()
        tensors[f"dense_finetuned/{n}"] = f.detach().cpu().contiguous()
        dense_meta[n] = {**spec(b), "sha256": sha256(b)}
    pid = patch_id(tensors, base)
    meta = {
        "format": PATCH_FORMAT,
        "version": PATCH_VERSION,
        "id": pid,
        "base": base_path,
        "finetuned": finetuned_path,
        "base_lineage": base.to_json(),
        "finetuned_tensors": json.dumps(finetuned) if finetuned is not None else "",
        "rows": json.dumps({n: int(rows.numel()) for n, (rows, _, _) in tables.items()}),
        "tables": json.dumps(
            {n: {**table_specs[n], "rows": int(r.numel())} for n, (r, _, _) in tables.items()}
        ),
        "dense": json.dumps(dense_meta),
        **(extra_meta or {}),
    }
    save_file(tensors, str(out), metadata=meta)
    return pid


def read_patch(path: str | os.PathLike) -> Patch:
    """Load and check a patch file's structure (not yet against any checkpoint)."""
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
    if meta.get("format") != PATCH_FORMAT:
        raise ConvertError(path, "not a titan_mem sparse delta (no 'format' metadata)")
    if meta.get("version") != PATCH_VERSION:
        raise ConvertError(
            path, f"delta version {meta.get('version')!r}; this tool reads {PATCH_VERSION} (recreate it)"
        )
    try:
        tables, dense = json.loads(meta["tables"]), json.loads(meta["dense"])
        lineage = json.loads(meta["base_lineage"])
        base = Lineage(root=dict(lineage["root"]), applied=list(lineage["applied"]))
        finetuned = json.loads(meta["finetuned_tensors"]) if meta.get("finetuned_tensors") else None
        _check_patch(path, tables, dense, tensors)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ConvertError(path, f"damaged delta metadata ({root_cause(e)})") from None
    if patch_id(tensors, base) != meta.get("id"):
        raise ConvertError(path, "its tensors do not match its recorded id (damaged or edited)")
    return Patch(path, meta["id"], meta, tables, dense, base, finetuned, tensors)


def _dtype(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_patch(path: Path, tables: dict, dense: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every table entry is complete and its stored rows fit the recorded shapes."""
    for n, m in {**tables, **dense}.items():
        if not isinstance(m["shape"], list) or _dtype(m["dtype"]) is None:
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


# ---------------------------------------------------------------------------------------------- applying


def check_applicable(patch: Patch, target: Lineage, where: Path, remove: bool) -> None:
    """Refuse a patch whose lineage does not fit the checkpoint it is applied to or removed from."""
    _same_names(where, set(target.root), set(patch.base.root), "the delta")
    if not remove or target.applied:
        for n, want in patch.base.root.items():
            if target.root[n] != want:
                raise ConvertError(
                    where,
                    f"'{n}' differs from the base checkpoint the delta was made from "
                    f"({patch.meta.get('base')}); refusing to apply",
                )
    if remove:
        if target.applied:
            if patch.id not in target.applied:
                raise ConvertError(where, f"the delta {patch.path} was not applied to this checkpoint")
        elif patch.finetuned is None:
            raise ConvertError(
                where, "has no patch lineage and the delta records no finetuned tensors; cannot remove"
            )
        else:
            for n, want in patch.finetuned.items():
                if target.root.get(n) != want:
                    raise ConvertError(
                        where,
                        f"'{n}' differs from the finetuned checkpoint the delta was made from "
                        f"({patch.meta.get('finetuned')}); refusing to remove",
                    )
        return
    missing = [a for a in patch.base.applied if a not in target.applied]
    if missing:
        raise ConvertError(where, f"the delta was trained on {len(missing)} patch(es) not applied here")
    if patch.id in target.applied:
        raise ConvertError(where, f"the delta {patch.path} is already applied to this checkpoint")


def apply_rows(model: dict[str, torch.Tensor], patch: Patch, where: Path, remove: bool = False) -> None:
    """In place: rows (and dense tensors) from the patch's `base` side to its `finetuned` side (or back),
    after checking bit for bit that they hold the side they come from."""
    have, want = ("finetuned", "base") if remove else ("base", "finetuned")
    for n in patch.tables:
        rows = patch.tensors[f"rows/{n}"].to(model[n].device)
        table = model[n]
        current = table.index_select(0, rows)
        expected = patch.tensors[f"{have}/{n}"].to(table.device)
        if not torch.equal(bits(current), bits(expected)):
            raise ConvertError(
                where,
                f"'{n}': rows the delta changes do not hold its {have} values (another patch changed "
                "them, or the wrong checkpoint); refusing",
            )
        table.index_copy_(0, rows, patch.tensors[f"{want}/{n}"].to(table.device, table.dtype))
    for n in patch.dense:
        if not torch.equal(bits(model[n]), bits(patch.tensors[f"dense_{have}/{n}"])):
            raise ConvertError(where, f"'{n}' does not hold the delta's {have} values; refusing")
        model[n] = patch.tensors[f"dense_{want}/{n}"].clone()


def after(lineage: Lineage, patch: Patch, remove: bool) -> Lineage:
    """The lineage of a checkpoint after applying (or removing) `patch`."""
    if remove:
        if lineage.applied:
            return Lineage(lineage.root, [a for a in lineage.applied if a != patch.id])
        return Lineage(patch.base.root, list(patch.base.applied))
    return Lineage(lineage.root, [*lineage.applied, patch.id])


def _same_names(path: Path, have: set[str], other: set[str], other_name: str) -> None:
    if have == other:
        return
    parts = []
    if have - other:
        parts.append(f"only here: {', '.join(sorted(have - other)[:3])}")
    if other - have:
        parts.append(f"only in {other_name}: {', '.join(sorted(other - have)[:3])}")
    raise ConvertError(path, f"model tensors do not match {other_name}'s ({'; '.join(parts)})")


# ---------------------------------------------------------------------------------------------- the CLI verbs


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


def changed_rows(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Sorted ids of rows that differ in any bit."""
    return torch.ne(bits(finetuned), bits(base)).any(1).nonzero().flatten()


def make_delta(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    allow_dense: bool = False,
    overwrite: bool = False,
    stream_bytes: int = STREAM_BYTES,
) -> DeltaSummary:
    """The changed value rows of `finetuned` against `base` (both sides), as a patch file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConvertError(out, f"unknown extension '{out.suffix}' (a delta is a .safetensors file)")
    check_new_output(out, overwrite, (Path(finetuned), Path(base)))
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
    tables = sorted(n for n in ft_names if is_value_table(n))
    if not tables:
        raise ConvertError(ft_idx.path, "has no memory value tables ('*values.weight')")
    for t in tables:
        if len(ft_idx.tensor_meta(ft_names[t]).size) < 2:
            raise ConvertError(ft_idx.path, f"value table '{t}' is not 2-D")
    base_lineage = read_lineage(base_idx, stream_bytes)
    names = sorted(ft_names)
    rows_out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    specs: dict[str, dict[str, Any]] = {}
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ft_specs: TensorSpecs = {}
    differing: list[str] = []
    for fts, bases in zip(
        iter_model_batches(ft_idx, names, stream_bytes), iter_model_batches(base_idx, names, stream_bytes)
    ):
        for n in fts:
            f, b = fts[n], bases[n]
            ft_specs[n] = {**spec(f), "sha256": sha256(f)}
            if n in tables:
                rows = changed_rows(f, b)
                rows_out[n] = (rows, b[rows], f[rows])
                specs[n] = spec(f)
            elif not torch.equal(bits(f), bits(b)):
                differing.append(n)
                dense[n] = (b, f)
    if differing and not allow_dense:
        shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise ConvertError(
            ft_idx.path,
            f"{len(differing)} non-value tensor(s) differ from the base ({shown}): not a sparse finetune "
            "(pass --allow-dense to store them whole)",
        )
    with atomic_file(out, overwrite, (ft_idx.path, base_idx.path)) as tmp:
        write_patch(
            tmp,
            rows_out,
            specs,
            base_lineage,
            str(base_idx.path.resolve()),
            finetuned_path=str(ft_idx.path.resolve()),
            finetuned=ft_specs,
            dense=dense,
        )
    return DeltaSummary(
        rows={n: int(r.numel()) for n, (r, _, _) in rows_out.items()},
        table_rows={n: specs[n]["shape"][0] for n in rows_out},
        dense=sorted(dense),
        nbytes=out.stat().st_size,
    )


def apply_delta(
    src: str | os.PathLike,
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    remove: bool = False,
    overwrite: bool = False,
) -> str:
    """Checkpoint + patch -> patched model (or, with `remove`, patched - patch); checked bit for bit. The
    output carries its lineage, so further patches can be stacked on it or removed from it."""
    check_new_output(Path(out_dir), overwrite, (Path(src), Path(delta)))
    patch = read_patch(delta)
    index = open_dcp(src)
    _check_specs(index, patch)
    lineage = read_lineage(index)
    check_applicable(patch, lineage, index.path, remove)
    model = load_model(index)
    apply_rows(model, patch, index.path, remove)
    new = after(lineage, patch, remove)
    save_dcp(
        {MODEL_KEY: model},
        Path(out_dir),
        overwrite,
        (index.path, patch.path),
        extra_files={LINEAGE_FILE: new.to_json()},
    )
    verb = "removed" if remove else "applied"
    return (
        f"wrote {out_dir}: {verb} {patch.n_rows} rows in {len(patch.tables)} table(s), "
        f"{len(patch.dense)} dense tensor(s); {len(new.applied)} patch(es) on its base"
    )


def _check_specs(index: DcpIndex, patch: Patch) -> None:
    """Names, shapes and dtypes first (cheap, from the metadata): a wrong model is named before hashing."""
    names = index.model_tensors()
    _same_names(index.path, set(names), set(patch.base.root), "the delta")
    for n, m in patch.base.root.items():
        md: TensorStorageMetadata = index.tensor_meta(names[n])
        have = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
        if have != {"shape": m["shape"], "dtype": m["dtype"]}:
            raise ConvertError(
                index.path,
                f"'{n}' is {have['shape']} {have['dtype']}, the delta's is {m['shape']} {m['dtype']}",
            )
