"""Memory-slot access counts: per batch (sparse), across data-parallel ranks, and the background file.

A batch's counts for one layer are kept sparse, as (touched, counts): sorted unique slot ids and how often
each was read. Every one of the heads * topk reads of a real (non-padding) token counts once.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from titan_mem.errors import write_errors

FORMAT = "titan_mem.background_counts"
FORMAT_VERSION = 1
COUNTS_FILE = (
    "background_counts.safetensors"  # its name in a checkpoint folder, where sparse finetuning looks
)
SparseCounts = tuple[torch.Tensor, torch.Tensor]


class SlotBackground:
    """One layer's background statistics: df[i] = background batches touching slot i, over N batches.

    `df_sum` (= df.sum()) may be given when already known; otherwise it is computed here, once, so the KL
    background normaliser sum_j (df_j + 1) = df_sum + n_slots never costs O(n_slots) per step.
    """

    def __init__(self, df: torch.Tensor, n_batches: int, df_sum: int | None = None) -> None:
        if df.dim() != 1:
            raise ValueError(f"background df: expected a 1-D tensor, got shape {tuple(df.shape)}")
        if n_batches < 0:
            raise ValueError(f"background n_batches: must be >= 0, got {n_batches}")
        self.df = df
        self.n_batches = int(n_batches)
        self.n_slots = df.numel()
        self.df_sum = int(df.sum().item()) if df_sum is None else int(df_sum)

    @property
    def bg_norm(self) -> int:
        """sum_j (df_j + 1) over all n_slots slots (Goyal et al. 2026, sec. 3.5, p_bg denominator)."""
        return self.df_sum + self.n_slots


def count_slots(indices: torch.Tensor, token_mask: torch.Tensor, n_slots: int) -> SparseCounts:
    """(touched, counts) of slot ids `indices` [B, T, H, k] where `token_mask` [B, T] is True.

    Padding is excluded here, not by the caller, so a padded fact batch never votes for the slots its pad
    tokens happen to read (Lin et al. 2025 mask padding indices the same way).
    """
    if indices.dim() != 4:
        raise ValueError(f"count_slots: indices must be [B, T, heads, topk], got {tuple(indices.shape)}")
    if token_mask.dtype != torch.bool or token_mask.shape != indices.shape[:2]:
        raise ValueError(
            f"count_slots: token_mask must be a bool [B, T] = {tuple(indices.shape[:2])}, got "
            f"{token_mask.dtype} {tuple(token_mask.shape)}"
        )
    ids = indices[token_mask.to(indices.device)].reshape(-1)
    if ids.numel() and (int(ids.min().item()) < 0 or int(ids.max().item()) >= n_slots):
        raise ValueError(
            f"count_slots: slot ids span [{int(ids.min().item())}, {int(ids.max().item())}], "
            f"outside [0, {n_slots})"
        )
    touched, counts = torch.unique(ids, sorted=True, return_counts=True)
    return touched, counts.to(torch.int64)


def merge_counts(*parts: SparseCounts) -> SparseCounts:
    """Sum several sparse counts into one (sorted unique ids); O(total K log K), no dense vector."""
    ids = torch.cat([p[0] for p in parts])
    cnt = torch.cat([p[1].to(torch.int64) for p in parts])
    touched, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return touched, torch.zeros_like(touched).index_add_(0, inverse, cnt)


class SlotCounter:
    """Accumulates each memory layer's sparse counts over the micro-batches of one optimizer step.

    Sparse merge (unique + index_add) rather than a dense bincount: cost follows the slots touched.
    """

    def __init__(self, n_slots: Mapping[str, int], device: torch.device | str | None = None) -> None:
        self.n_slots = dict(n_slots)
        # Under NCCL the collectives need tensors on the rank's GPU: pass that device here.
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (call after each optimizer step)."""
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._counts: dict[str, SparseCounts] = {name: (empty, empty) for name in self.n_slots}

    def add(self, layer: str, touched: torch.Tensor, counts: torch.Tensor) -> None:
        """Merge one micro-batch's sparse counts (from `count_slots`) into `layer`."""
        cur = self._counts[self._name(layer)]
        self._counts[layer] = merge_counts(cur, (touched.to(self.device), counts.to(self.device)))

    def add_indices(self, layer: str, indices: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Count one micro-batch's slot ids [B, T, H, k] for `layer`, padding excluded."""
        self.add(layer, *count_slots(indices, token_mask, self._n(layer)))

    def add_slots(self, slots: Mapping[str, torch.Tensor], token_mask: torch.Tensor) -> None:
        """Count one micro-batch's slots of every layer (`Transformer.forward(..., return_slots=True)`)."""
        missing = set(self.n_slots) - set(slots)
        if missing:
            raise ValueError(f"slot counts: no slots for memory layer(s) {sorted(missing)} in this forward")
        for name in self.n_slots:
            self.add_indices(name, slots[name], token_mask)

    def local(self, layer: str) -> SparseCounts:
        """This rank's (touched, counts) for `layer`."""
        return self._counts[self._name(layer)]

    def global_counts(
        self, group: dist.ProcessGroup | None = None, method: str = "auto"
    ) -> dict[str, SparseCounts]:
        """Per layer (touched, counts) summed over every rank of `group`; every rank gets the same answer.

        Two exact strategies, chosen identically on every rank from the gathered local sizes:
        "gather": all_gather each rank's (ids, counts), padded to the largest K, then merge; moves
          world * max_K * 16 bytes, which follows the slots touched (small batches, huge tables).
        "dense": index_add into an int32 [n_slots] vector and all_reduce it; moves n_slots * 4 bytes
          (4 MiB at 1M slots, whatever the world size), better once world * max_K * 16 exceeds that.
        "auto" picks the smaller. int32 is exact: a slot's count per step is far below 2**31.
        A no-op (local counts) when torch.distributed is not initialised or the group has one rank.
        """
        if method not in ("auto", "gather", "dense"):
            raise ValueError(f"slot counts: method must be auto, gather or dense, got {method!r}")
        names = sorted(self.n_slots)
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return {name: self._counts[name] for name in names}
        world = dist.get_world_size(group)
        sizes = [self._counts[n][0].numel() for n in names]
        sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        per_rank = torch.stack(all_sizes).cpu()  # [world, layers]
        out = {}
        for j, name in enumerate(names):
            max_k = int(per_rank[:, j].max())
            dense_smaller = world * max_k * 16 > self.n_slots[name] * 4
            use_dense = method == "dense" or (method == "auto" and dense_smaller)
            if use_dense:
                out[name] = self._reduce_dense(name, group)
            else:
                out[name] = self._gather_sparse(name, per_rank[:, j].tolist(), max_k, group)
        return out

    def _gather_sparse(self, name: str, sizes: list[int], max_k: int, group) -> SparseCounts:
        touched, counts = self._counts[name]
        packed = torch.zeros(2, max_k, dtype=torch.int64, device=self.device)
        packed[0, : touched.numel()] = touched
        packed[1, : touched.numel()] = counts
        gathered = [torch.empty_like(packed) for _ in sizes]
        dist.all_gather(gathered, packed, group=group)
        return merge_counts(*[(g[0, :k], g[1, :k]) for g, k in zip(gathered, sizes)])

    def _reduce_dense(self, name: str, group) -> SparseCounts:
        touched, counts = self._counts[name]
        dense = torch.zeros(self.n_slots[name], dtype=torch.int32, device=self.device)
        dense.index_add_(0, touched, counts.to(torch.int32))
        dist.all_reduce(dense, op=dist.ReduceOp.SUM, group=group)
        ids = torch.nonzero(dense).squeeze(1)
        return ids, dense[ids].to(torch.int64)

    def _name(self, layer: str) -> str:
        if layer not in self.n_slots:
            raise ValueError(f"slot counts: unknown memory layer {layer!r}, have {sorted(self.n_slots)}")
        return layer

    def _n(self, layer: str) -> int:
        return self.n_slots[self._name(layer)]


def _titan_mem_version() -> str:
    try:
        from importlib.metadata import version

        return version("titan_mem")
    except Exception:
        return "unknown"


@dataclass
class BackgroundCounts:
    """Background slot statistics per memory layer (Lin et al. 2025: df over N pretraining batches).

    df[layer][i]    = number of background batches in which slot i was read at least once;
    total[layer][i] = total reads of slot i over those batches (kept for analysis / other scores).
    `metadata` records where the counts came from and the batch shape they were counted over, so a
    finetune cannot silently use the wrong file.
    """

    df: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    _views: dict[str, SlotBackground] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(
        cls,
        n_slots: Mapping[str, int],
        checkpoint: str = "",
        checkpoint_step: int = -1,
        data_source: str = "",
        batch_size: int = 0,
        seq_len: int = 0,
        tokens_per_batch: float = 0.0,
    ) -> BackgroundCounts:
        """Zero counts for each layer, with the provenance metadata filled in.

        batch_size x seq_len is the shape of one background batch (sequences x tokens); tokens_per_batch
        the mean number of non-padding tokens in one. Sparse finetuning checks the shape against its own
        batches (`check_counts_batch_shape`): idf only means something for batches of the same size.
        """
        names = sorted(n_slots)
        meta = {
            "checkpoint": str(checkpoint),
            "checkpoint_step": int(checkpoint_step),
            "data_source": str(data_source),
            "n_batches": 0,
            "batch_size": int(batch_size),
            "seq_len": int(seq_len),
            "tokens_per_batch": float(tokens_per_batch),
            "layers": names,
            "n_slots": {n: int(n_slots[n]) for n in names},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "titan_mem_version": _titan_mem_version(),
        }
        return cls(
            df={n: torch.zeros(n_slots[n], dtype=torch.int64) for n in names},
            total={n: torch.zeros(n_slots[n], dtype=torch.int64) for n in names},
            metadata=meta,
            batches={n: 0 for n in names},
        )

    @property
    def layers(self) -> list[str]:
        return sorted(self.df)

    @property
    def n_batches(self) -> int:
        """N, the number of background batches (the same for every layer)."""
        seen = set(self.batches.values())
        if len(seen) > 1:
            raise ValueError(f"background counts: layers saw different numbers of batches {self.batches}")
        return seen.pop() if seen else 0

    def add_batch(self, layer: str, touched: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one (global) batch's sparse counts for `layer`: df += 1 where touched, total += counts."""
        if layer not in self.df:
            raise ValueError(f"background counts: unknown layer {layer!r}, have {self.layers}")
        touched = touched.to(self.df[layer].device)
        if touched.numel() > 1 and not bool((touched[1:] > touched[:-1]).all()):
            raise ValueError("background counts: touched slot ids must be sorted and unique")
        self.df[layer].index_add_(0, touched, torch.ones_like(touched))
        self.total[layer].index_add_(0, touched, counts.to(touched.device, torch.int64))
        self.batches[layer] = self.batches.get(layer, 0) + 1
        self._views.clear()  # N changed
        self.metadata["n_batches"] = max(self.batches.values())  # layers agree once the batch is done

    def layer(self, name: str) -> SlotBackground:
        """The scoring view (df, N) of one layer, cached: df.sum() runs once, not on every step."""
        if name not in self.df:
            raise ValueError(f"background counts: no layer {name!r}, have {self.layers}")
        if name not in self._views:
            self._views[name] = SlotBackground(self.df[name], self.n_batches)
        return self._views[name]


def save_background_counts(path: str | os.PathLike, bg: BackgroundCounts) -> None:
    """Write `bg` as one safetensors file, atomically (path.tmp, then os.replace): never half-written.

    Tensors "{layer}.df" and "{layer}.total"; every metadata value is stored JSON-encoded (safetensors
    metadata must be str -> str), which keeps ints, lists and dicts exact on reload.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = dict(bg.metadata)
    meta["n_batches"] = bg.n_batches
    meta["layers"] = bg.layers
    meta["n_slots"] = {n: int(bg.df[n].numel()) for n in bg.layers}
    header = {k: json.dumps(v) for k, v in meta.items()}
    header["format"] = FORMAT
    header["format_version"] = str(FORMAT_VERSION)
    tensors = {}
    for n in bg.layers:
        tensors[f"{n}.df"] = bg.df[n].detach().cpu().contiguous()
        tensors[f"{n}.total"] = bg.total[n].detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with write_errors(path, "writing background counts"):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=header)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"background counts file {path}: {' '.join(why.split())}")


RECOUNT = (
    "recount with tools/background_counts.py CONFIG --finetune-config FINETUNE.toml (or --batch-size B "
    "--seq-len L), or set finetune.counts_shape_tolerance=0 to accept any shape (ablations)"
)


def check_counts_batch_shape(
    path: str | os.PathLike, meta: Mapping[str, Any], batch_size: int, seq_len: int, tolerance: float
) -> None:
    """Refuse counts whose background batch is not about the size of the finetuning batch.

    idf = log((N+1)/(df+1)) compares how many background batches read a slot with how many a fact batch's
    tokens read: with background batches much larger than the finetuning batch every used slot has
    df = N and idf = 0. The capacities (sequences x seq_len) are compared as max(a/b, b/a) <= `tolerance`;
    0 accepts any shape (the explicit override for ablations). The default 2 (FinetuneConfig) comes from
    docs/benchmarks.md, "Slot selection": at the debug size the idf-0 share of slots grows from 12 % (1x) to
    30 % (2x) and 79 % (16x), and selected rows first get idf 0 between 4x and 8x. Raises one ValueError line
    naming the file and both shapes.
    """
    if tolerance == 0:
        return
    path = Path(path)
    have_b, have_l = meta.get("batch_size"), meta.get("seq_len")
    if not (isinstance(have_b, int) and isinstance(have_l, int) and have_b > 0 and have_l > 0):
        raise _bad(path, f"recorded no batch shape; {RECOUNT}")
    have, want = have_b * have_l, batch_size * seq_len
    ratio = max(have / want, want / have)
    if ratio > tolerance:
        raise _bad(
            path,
            f"counted over {have_b} x {have_l}-token batches, but this finetune's batches are "
            f"{batch_size} x {seq_len} (ratio of tokens per batch {round(ratio, 2)} > tolerance "
            f"{tolerance}); {RECOUNT}",
        )


def _check_counts_values(path: Path, meta: dict, tensors: dict[str, torch.Tensor], layers: list[str]) -> int:
    """Refuse counts that would score nonsense: idf = log((N+1)/(df+1)) needs integer 0 <= df <= N (a
    negative df gives NaN scores, which then select the lowest slot ids). Returns N."""
    n_batches = meta.get("n_batches")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
        raise _bad(path, f"metadata n_batches must be a whole number >= 0, got {n_batches!r}")
    for n in layers:
        for kind in ("df", "total"):
            t = tensors[f"{n}.{kind}"]
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dim() != 1:
                raise _bad(path, f"{n}.{kind} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
            if t.numel() and int(t.min()) < 0:
                raise _bad(path, f"{n}.{kind} has negative counts (min {int(t.min())})")
        df = tensors[f"{n}.df"]
        if df.numel() and int(df.max()) > n_batches:
            raise _bad(path, f"{n}.df counts {int(df.max())} batches, more than n_batches={n_batches}")
        if tensors[f"{n}.total"].numel() != df.numel():
            raise _bad(path, f"{n}.total and {n}.df differ in length")
    return n_batches


def load_background_counts(
    path: str | os.PathLike,
    expect_layers: Mapping[str, int] | None = None,
    expect_checkpoint: str | os.PathLike | None = None,
    expect_batch: tuple[int, int] | None = None,
    shape_tolerance: float = 0.0,
) -> BackgroundCounts:
    """Load a file written by `save_background_counts`, checking it fits the model being finetuned.

    expect_layers: {layer name: n_slots} of the model; each must be present with that many slots.
    expect_checkpoint: the checkpoint being finetuned; must resolve to the path recorded in the file.
    expect_batch: the finetune's (sequences per batch, seq_len); the counts' batch shape must be within
    `shape_tolerance` of it (`check_counts_batch_shape`; tolerance 0 accepts any shape).
    None skips a check. Any problem is one ValueError line naming the file and the mismatch.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _bad(path, "not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
        raise _bad(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    if header.get("format") != FORMAT:
        raise _bad(path, f"not a titan_mem background counts file (format={header.get('format')!r})")
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "format_version")}
    except json.JSONDecodeError as e:
        raise _bad(path, f"corrupt metadata ({e})") from e
    layers = list(meta.get("layers", []))
    for n in layers:
        if f"{n}.df" not in tensors or f"{n}.total" not in tensors:
            raise _bad(path, f"tensors for layer {n!r} are missing")
    if expect_layers is not None:
        for n, want in expect_layers.items():
            if n not in layers:
                raise _bad(path, f"layer {n!r} missing (file has {layers})")
            have = tensors[f"{n}.df"].numel()
            if have != int(want):
                raise _bad(path, f"layer {n!r} has {have} slots, the model has {int(want)}")
    if expect_checkpoint is not None:
        recorded = meta.get("checkpoint", "")
        if Path(recorded).resolve() != Path(expect_checkpoint).resolve():
            raise _bad(path, f"counted on checkpoint {recorded!r}, but finetuning {str(expect_checkpoint)!r}")
    if expect_batch is not None:
        check_counts_batch_shape(path, meta, expect_batch[0], expect_batch[1], shape_tolerance)
    n_batches = _check_counts_values(path, meta, tensors, layers)
    return BackgroundCounts(
        df={n: tensors[f"{n}.df"] for n in layers},
        total={n: tensors[f"{n}.total"] for n in layers},
        metadata=meta,
        batches={n: n_batches for n in layers},
    )
