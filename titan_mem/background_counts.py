"""Counting background slot statistics (Lin et al. 2025, sec. 3: df over N background batches).

idf = log((N+1)/(df+1)) only separates slots when one background batch reads a small part of the table, so a
background batch has the *finetuning* batch's shape (sequences x seq_len), not the pretraining one: counted
over pretraining-sized batches nearly every used slot has df = N and idf = 0 (docs/benchmarks.md, "Slot
selection"). `count_background` runs forward only over N such batches of the config's (pretraining) data and
records df(i) = batches in which slot i was read and total(i) = reads, padding excluded, plus the batch shape
(`batch_size`, `seq_len`, mean non-padding `tokens_per_batch`) that sparse finetuning checks.

Batch i is processed whole by rank i % world_size and every rank reads the same stream, so any number of
ranks gives exactly the counts of one. The file is written atomically (`save_background_counts`).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from titan_mem.checkpoint import CheckpointError, CheckpointManager, step_dirs
from titan_mem.checkpoint.content import load_model_weights
from titan_mem.components.model import build_model
from titan_mem.config import Config
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.distributed import all_reduce_sum, init_distributed
from titan_mem.errors import ConfigError, check_writable
from titan_mem.hf.retrofit import model_args_for
from titan_mem.sparse.counts import (
    COUNTS_FILE,
    BackgroundCounts,
    count_slots,
    merge_counts,
    save_background_counts,
)


def default_checkpoint(cfg: Config) -> Path:
    """The checkpoint to count on when none is given: `checkpoint.initial_load_path`, else the newest
    step folder of the config's run (the usual case right after pretraining)."""
    if cfg.checkpoint.initial_load_path:
        return Path(cfg.checkpoint.initial_load_path)
    folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    found = step_dirs(folder)
    if not found:
        raise CheckpointError(f"{folder}: no checkpoint found (pass --checkpoint)")
    return found[max(found)]


def micro_batch_size(batch_size: int, micro_batch_size: int) -> int:
    """Rows per forward, so that whole micro-batches make up exactly `batch_size` sequences.

    The loader yields only full micro-batches, and cutting one short would drop sequences from the
    shared stream, so a batch that is not a whole number of micro-batches is refused.
    """
    if batch_size <= 0:
        raise ConfigError(f"--batch-size: must be positive; got {batch_size}")
    micro = min(micro_batch_size, batch_size)
    if batch_size % micro:
        raise ConfigError(
            f"--batch-size: {batch_size} is not a multiple of training.micro_batch_size {micro_batch_size}"
        )
    return micro


def model_max_seq_len(cfg: Config, tokenizer) -> int:
    """The longest sequence the config's model takes (its rotary table), for refusing a longer --seq-len."""
    return model_args_for(cfg, tokenizer.n_words).max_seq_len


def count_background(
    cfg: Config,
    checkpoint: str | Path,
    n_batches: int,
    batch_size: int,
    seq_len: int,
    out: str | Path | None = None,
) -> Path:
    """Count df and total reads per memory slot over `n_batches` batches of `batch_size` x `seq_len` tokens.

    `cfg` supplies the model, tokenizer and data (its training.seq_len/global_batch_size are not used: the
    shape is the finetuning batch's). Loads the model weights of `checkpoint`, writes the counts to `out`
    (default `<checkpoint>/background_counts.safetensors`, where sparse finetuning looks) and returns that
    path. Works alone or under torchrun (every rank calls it).
    """
    if n_batches <= 0:
        raise ConfigError(f"--batches: must be positive; got {n_batches}")
    if seq_len <= 0:
        raise ConfigError(f"--seq-len: must be positive; got {seq_len}")
    cfg = copy.deepcopy(cfg)
    cfg.training.mode = "pretrain"  # forward only; no mode-specific freezing or adapters
    micro = micro_batch_size(batch_size, cfg.training.micro_batch_size)
    tokenizer = build_tokenizer(cfg.tokenizer)
    max_len = model_max_seq_len(cfg, tokenizer)
    if seq_len > max_len:
        raise ConfigError(f"--seq-len: {seq_len} exceeds the model's max_seq_len {max_len}")
    cfg.training.seq_len = seq_len

    dist_info = init_distributed(cfg.training.device)
    rank, world = dist_info.rank, dist_info.world_size
    ckpt_path = Path(checkpoint)
    out = Path(out) if out else ckpt_path / COUNTS_FILE
    check_writable(out)  # before the model is built and 1000 batches are counted
    model, _ = build_model(cfg, dist_info, tokenizer)
    manager = CheckpointManager(ckpt_path.parent, rank=rank, dp_world_size=world, keep_latest_k=0)
    load_model_weights(manager, ckpt_path, model)
    model.eval()
    layers = model.memory_layers()
    if not layers:
        raise ConfigError("model.memory_layers: the model has no memory layer to count")
    n_slots = {name: layer.value_table.weight.shape[0] for name, layer in layers.items()}
    step = int(ckpt_path.name.split("-")[-1]) if ckpt_path.name.startswith("step-") else -1
    bg = BackgroundCounts.empty(
        n_slots,
        checkpoint=str(ckpt_path.resolve()),
        checkpoint_step=step,
        data_source=cfg.data.source,
        batch_size=batch_size,
        seq_len=seq_len,
    )
    # Every rank reads the whole stream in micro-batches; batch i belongs to rank i % world. (A finetuning
    # regime's unit is the batch, e.g. one fact per batch: global_batch_size tells the loader.)
    loader = build_dataloader(
        cfg.data,
        tokenizer,
        seq_len=seq_len,
        micro_batch_size=micro,
        dp_rank=0,
        dp_world_size=1,
        global_batch_size=batch_size,
    )
    stream = iter(loader)
    per_batch = batch_size // micro  # exact: micro_batch_size refused a remainder
    tokens_local, t0 = 0, time.perf_counter()
    progress = _progress(n_batches, enabled=rank == 0)
    # FSDP forwards are collectives, so ranks move in lockstep: in round r every rank reads the same W
    # batches from the stream and runs batch r * W + rank. A rank past the last batch runs a discarded
    # forward so the others are not left waiting.
    with torch.no_grad():
        for round_start in range(0, n_batches, world):
            own: list[dict] = []
            for b in range(round_start, min(round_start + world, n_batches)):
                micro_batches = [_next(stream, b, n_batches) for _ in range(per_batch)]
                if b % world == rank:
                    own = micro_batches
            counted = bool(own)
            if not counted:
                own = micro_batches  # a stand-in for the collective only
            parts: dict[str, list] = {name: [] for name in layers}
            for batch in own:
                mask = batch["token_mask"].to(dist_info.device)
                slots = model.memory_slots(batch["input_ids"].to(dist_info.device))
                if counted:
                    tokens_local += int(mask.sum())
                    for name in layers:
                        parts[name].append(count_slots(slots[name], mask, n_slots[name]))
            if counted:
                for name in layers:
                    touched, counts = merge_counts(*parts[name])
                    bg.add_batch(name, touched.cpu(), counts.cpu())
            done = min(round_start + world, n_batches)
            progress(done, tokens_local * world / max(time.perf_counter() - t0, 1e-9))
    for name in layers:  # each batch was counted on exactly one rank: sums are exact
        bg.df[name] = all_reduce_sum(bg.df[name].to(dist_info.device)).cpu()
        bg.total[name] = all_reduce_sum(bg.total[name].to(dist_info.device)).cpu()
        bg.batches[name] = n_batches
    tokens = all_reduce_sum(torch.tensor([tokens_local], dtype=torch.int64, device=dist_info.device))
    bg.metadata["n_batches"] = n_batches
    bg.metadata["tokens_per_batch"] = int(tokens.item()) / n_batches
    bg._views.clear()
    if rank == 0:
        save_background_counts(out, bg)
        print(
            f"wrote {out}: {n_batches} batches x {batch_size} sequences x {seq_len} tokens "
            f"({bg.metadata['tokens_per_batch']:.1f} non-padding tokens per batch), layers {sorted(layers)}",
            flush=True,
        )
    if dist.is_initialized():
        dist.barrier()
    return out


def _next(stream: Iterator[dict], b: int, total: int) -> dict:
    try:
        return next(stream)
    except StopIteration:
        raise ConfigError(
            f"data.source: ran out after {b} of {total} batches (set data.repeat=true or fewer --batches)"
        ) from None


def _progress(total: int, enabled: bool) -> Callable[[int, float], None]:
    """A one-line progress report on stderr (about 20 updates per run)."""
    every = max(1, total // 20)

    def report(done: int, tokens_per_s: float) -> None:
        if enabled and (done % every == 0 or done == total):
            print(
                f"\rbackground counts: {done}/{total} batches, {tokens_per_s:,.0f} tokens/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
            if done == total:
                print(file=sys.stderr)

    return report


def idf_stats(bg: BackgroundCounts) -> dict[str, float]:
    """Share of all slots (every layer together) with idf exactly 0 (df = N) and never read (df = 0).

    The first is the symptom of background batches that are too large for the finetuning batch: a slot with
    idf 0 scores 0 under tf-idf however often the fact batch reads it.
    """
    n = bg.n_batches
    slots = sum(bg.df[name].numel() for name in bg.layers)
    zero = sum(int((bg.df[name] == n).sum()) for name in bg.layers)
    unread = sum(int((bg.df[name] == 0).sum()) for name in bg.layers)
    return {"idf_zero": zero / max(1, slots), "never_read": unread / max(1, slots)}


def selected_idf_zero(bg: BackgroundCounts, selection_log: str | Path) -> float:
    """Share of the rows a sparse-finetune run selected (its selected_slots.jsonl, all steps and layers)
    whose background idf is 0, i.e. rows tf-idf kept although the background reads them in every batch."""
    picked = zero = 0
    for line in Path(selection_log).read_text().splitlines():
        if not line.strip():
            continue
        for name, rows in json.loads(line)["selected"].items():
            ids = torch.tensor(rows, dtype=torch.long)
            picked += ids.numel()
            zero += int((bg.df[name][ids] == bg.n_batches).sum())
    return zero / max(1, picked)
