"""Checkpoint conversion: DCP <-> one consolidated file, and model-only exports (LoRA merged, or a sparse
checkpoint applied onto its base).

Why each piece exists:

* `to_file` / `to_dcp`: a DCP folder is many files plus a pickled index; sharing, inspecting or loading a
  checkpoint outside the trainer wants one file. `.pt` keeps the whole nested state (model, optimizer,
  schedule, per-rank bytes, train state) and loads with `torch.load(weights_only=True)`, so `to_dcp` gives
  back the same flattened keys and values. `.safetensors` holds only the model, keyed by the model's own
  FQNs (`layers.0.attention.wq.weight`, no `model.` prefix), which is what other tools expect.
* `export_model`: a finetuning run starts from model weights only; with `merge_lora` the adapters are
  folded into the base weights so the result loads into a plain model.
Reading needs no process group (`no_dist=True`); every write goes to `<out>.partial` / `<out>.tmp` and is
renamed into place only when complete. Problems raise `ConvertError` with a one-line `<path>: <what>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from titan_mem.checkpoint.content import PATCH_FILE, is_sparse_checkpoint
from titan_mem.checkpoint.dcp_index import MODEL_KEY, load_model, load_nested, open_dcp
from titan_mem.checkpoint.files import atomic_file, check_new_output, nbytes, save_dcp
from titan_mem.checkpoint.patches import (
    LINEAGE_FILE,
    Lineage,
    after,
    apply_rows,
    check_applicable,
    read_lineage,
    read_patch,
)
from titan_mem.errors import ConvertError, root_cause
from titan_mem.models.lora import merge_lora_state_dict

FILE_SUFFIXES = (".pt", ".safetensors")


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
    check_new_output(out, overwrite, (Path(dcp_dir),))
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
        return f"wrote {out}: {len(model)} model tensors, {nbytes(model.values()) / 2**20:.1f} MiB"
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
    check_new_output(Path(out_dir), overwrite, (Path(src),))
    state = read_file(src)
    save_dcp(state, Path(out_dir), overwrite, (Path(src),))
    return f"wrote {out_dir}: {len(state[MODEL_KEY])} model tensors" + (
        f" + {', '.join(k for k in state if k != MODEL_KEY)}" if len(state) > 1 else ""
    )


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
    base: str | os.PathLike | None = None,
) -> str:
    """A model-only DCP folder (optionally LoRA-merged; a sparse checkpoint applied onto its base, recording
    the lineage so the patch can be removed again): the start of a finetuning run or an evaluation."""
    check_new_output(Path(out_dir), overwrite, (Path(dcp_dir),))
    if merge and lora_alpha is None:
        raise ConvertError(dcp_dir, "--merge-lora needs --lora-alpha (the run's finetune.lora_alpha)")
    model, lineage, note = load_any_model(Path(dcp_dir), Path(base) if base else None)
    if merge:
        n = len(lora_prefixes(model))
        model = merge_lora(model, lora_alpha, Path(dcp_dir))
        note += f", merged {n} LoRA adapters"
    extra = {LINEAGE_FILE: lineage.to_json()} if lineage is not None and lineage.applied else None
    save_dcp({MODEL_KEY: model}, Path(out_dir), overwrite, (Path(dcp_dir),), extra_files=extra)
    return f"wrote {out_dir}: {len(model)} model tensors{note}"


def load_any_model(
    path: Path, base: Path | None = None
) -> tuple[dict[str, torch.Tensor], Lineage | None, str]:
    """Model tensors of a full checkpoint, or of a sparse one applied onto its base (`base`, else the path
    its patch records; a base that is itself sparse resolves the same way), with the result's lineage."""
    if not is_sparse_checkpoint(path):
        return load_model(open_dcp(path)), None, ""
    patch = read_patch(path / PATCH_FILE)
    base = base or Path(patch.meta["base"])
    model, lineage, note = load_any_model(base)
    if lineage is None:
        lineage = read_lineage(open_dcp(base))
    check_applicable(patch, lineage, base, remove=False)
    apply_rows(model, patch, path)
    return (
        model,
        after(lineage, patch, remove=False),
        note + f", applied {patch.n_rows} patched rows onto {base}",
    )
