"""Background slot counts for sparse memory finetuning (Lin et al. 2025, sec. 3: df over N batches).

    python tools/background_counts.py CONFIG [--checkpoint STEP_DIR] [--batches 1000] [--batch-size B]
                                      [--out FILE] [--section.key=value ...]
    NGPU=8: torchrun --nproc_per_node=8 tools/background_counts.py CONFIG ...

Loads the model weights of a checkpoint (default: `checkpoint.initial_load_path`, else the newest checkpoint
of the config's run), runs forward only over N batches of the config's data (by default its pretraining
data), and records per memory layer df(i) = batches in which slot i was read and total(i) = reads. Padding
positions never count. Batch i is processed whole by rank i % world_size, and every rank reads the same
stream, so any number of ranks gives exactly the counts of one. Output: one safetensors file with
metadata, written atomically; by default into the checkpoint folder, where sparse finetuning looks first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from titan_mem import config as config_mod
from titan_mem.checkpoint import CheckpointError, CheckpointManager, step_dirs
from titan_mem.config import ConfigError
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.distributed import all_reduce_sum, exit_process, init_distributed
from titan_mem.modes import TrainMode
from titan_mem.sparse.counts import BackgroundCounts, count_slots, merge_counts, save_background_counts
from titan_mem.train import build_model, run_cli

DEFAULT_NAME = "background_counts.safetensors"


def _checkpoint_path(cfg, given: str | None) -> Path:
    if given:
        return Path(given)
    if cfg.checkpoint.initial_load_path:
        return Path(cfg.checkpoint.initial_load_path)
    found = step_dirs(Path(cfg.job.dump_folder) / cfg.checkpoint.folder)
    if not found:
        raise CheckpointError(
            f"{Path(cfg.job.dump_folder) / cfg.checkpoint.folder}: no checkpoint found (pass --checkpoint)"
        )
    return found[max(found)]


def run(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description="Background memory-slot counts", add_help=True)
    parser.add_argument("config")
    parser.add_argument("--checkpoint", help="checkpoint step folder to load the model from")
    parser.add_argument("--batches", type=int, default=1000, help="N background batches (paper: 1000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="sequences per batch (default training.global_batch_size); a multiple of "
        "training.micro_batch_size, or at most it",
    )
    parser.add_argument("--out", help=f"output file (default <checkpoint>/{DEFAULT_NAME})")
    args, overrides = parser.parse_known_args(argv)
    if args.batches <= 0:
        raise ConfigError(f"--batches: must be positive; got {args.batches}")
    cfg = config_mod.parse_args([args.config, *overrides])
    cfg.training.mode = "pretrain"  # forward only; no mode-specific freezing or adapters
    batch_size = args.batch_size or cfg.training.global_batch_size
    micro = _micro_batch_size(batch_size, cfg.training.micro_batch_size)

    dist_info = init_distributed(cfg.training.device)
    rank, world = dist_info.rank, dist_info.world_size
    ckpt_path = _checkpoint_path(cfg, args.checkpoint)
    out = Path(args.out) if args.out else ckpt_path / DEFAULT_NAME
    tokenizer = build_tokenizer(cfg.tokenizer)
    model, _ = build_model(cfg, dist_info, tokenizer, TrainMode(cfg))
    manager = CheckpointManager(ckpt_path.parent, rank=rank, dp_world_size=world, keep_latest_k=0)
    manager.load_model_only(ckpt_path, model)
    model.eval()
    layers = model.memory_layers()
    if not layers:
        raise ConfigError("model.memory_layers: the model has no memory layer to count")
    for layer in layers.values():
        layer.record_indices = True
    n_slots = {name: layer.value_table.weight.shape[0] for name, layer in layers.items()}
    step = int(ckpt_path.name.split("-")[-1]) if ckpt_path.name.startswith("step-") else -1
    bg = BackgroundCounts.empty(
        n_slots,
        checkpoint=str(ckpt_path.resolve()),
        checkpoint_step=step,
        data_source=cfg.data.source,
        batch_size=batch_size,
        seq_len=cfg.training.seq_len,
    )
    # Every rank reads the whole stream in micro-batches; batch i belongs to rank i % world.
    loader = build_dataloader(
        cfg.data, tokenizer, seq_len=cfg.training.seq_len, micro_batch_size=micro, dp_rank=0, dp_world_size=1
    )
    stream = iter(loader)
    per_batch = batch_size // micro  # exact: _micro_batch_size refused a remainder
    tokens_local, t0 = 0, time.perf_counter()
    progress = _progress(args.batches, enabled=rank == 0)
    # FSDP forwards are collectives, so ranks move in lockstep: in round r every rank reads the same W
    # batches from the stream and runs batch r * W + rank. A rank past the last batch runs a discarded
    # forward so the others are not left waiting.
    with torch.no_grad():
        for round_start in range(0, args.batches, world):
            own: list[dict] = []
            for b in range(round_start, min(round_start + world, args.batches)):
                micro_batches = [_next(stream, b, args.batches) for _ in range(per_batch)]
                if b % world == rank:
                    own = micro_batches
            counted = bool(own)
            if not counted:
                own = micro_batches  # a stand-in for the collective only
            parts: dict[str, list] = {name: [] for name in layers}
            for batch in own:
                mask = batch["token_mask"].to(dist_info.device)
                model(batch["input_ids"].to(dist_info.device))
                if counted:
                    tokens_local += int(mask.sum())
                    for name, layer in layers.items():
                        parts[name].append(count_slots(layer.last_indices, mask, n_slots[name]))
            if counted:
                for name in layers:
                    touched, counts = merge_counts(*parts[name])
                    bg.add_batch(name, touched.cpu(), counts.cpu())
            done = min(round_start + world, args.batches)
            progress(done, tokens_local * world / max(time.perf_counter() - t0, 1e-9))
    for name in layers:  # each batch was counted on exactly one rank: sums are exact
        bg.df[name] = all_reduce_sum(bg.df[name].to(dist_info.device)).cpu()
        bg.total[name] = all_reduce_sum(bg.total[name].to(dist_info.device)).cpu()
        bg.batches[name] = args.batches
    bg.metadata["n_batches"] = args.batches
    bg._views.clear()
    if rank == 0:
        save_background_counts(out, bg)
        print(
            f"wrote {out}: {args.batches} batches x {batch_size} sequences x {cfg.training.seq_len} tokens, "
            f"layers {sorted(layers)}",
            flush=True,
        )
    if dist.is_initialized():
        dist.barrier()
    return out


def _micro_batch_size(batch_size: int, micro_batch_size: int) -> int:
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


def _next(stream, b: int, total: int) -> dict:
    try:
        return next(stream)
    except StopIteration:
        raise ConfigError(
            f"data.source: ran out after {b} of {total} batches (set data.repeat=true or fewer --batches)"
        ) from None


def _progress(total: int, enabled: bool):
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


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
