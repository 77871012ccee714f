"""Pretraining global batches built from fixed logical streams, so the data does not depend on the rank count.

The source is split into L = `data.streams` logical streams (stream j = shard j of L, `data/sources.py`).
Optimizer step t reads the same G windows (the global batch) whatever the number of ranks or workers:
k = G / L consecutive windows from every stream, stream 0's first. With D data-parallel ranks, rank r owns
streams [r L/D, (r+1) L/D): its G/D windows are their chunks in stream order, cut into micro-batches.
DataLoader worker w of a rank produces the chunks of its streams w, w + W, ...; the loader puts each
step's chunks back in stream order, so workers change speed, never content.

The state is one position per stream (`text.PackedStream.state`), so a checkpoint saved under D ranks
resumes under D' ranks: every rank takes the positions of the streams it owns now (`merge_positions`).
Nothing is seen twice or skipped by a resize; only L must stay the same (it is part of the state).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import IterableDataset, get_worker_info

from titan_mem.data.documents import DocStats, DocumentSource
from titan_mem.data.packing import windows_to_batch
from titan_mem.data.text import PackedStream, check_stream_state, initial_stream_state
from titan_mem.data.tokenizer import Tokenizer
from titan_mem.errors import ConfigError, DataError, quiet_lost_connections

AUTO_MAX_STREAMS = 64  # auto `data.streams`: enough for 64-way data parallelism, few files per stream
AUTO_MAX_WORKERS = 4  # auto `data.num_workers`: tokenizing more than this ahead never paid off
STATE_KIND = "pretrain_streams"
STATE_VERSION = 2


@dataclass(frozen=True)
class StreamLayout:
    """Which streams a rank reads and how many windows each gives per optimizer step."""

    num_streams: int
    windows_per_chunk: int
    dp_rank: int
    dp_world_size: int

    @property
    def mine(self) -> list[int]:
        per_rank = self.num_streams // self.dp_world_size
        return list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))


def choose_layout(requested: int, global_windows: int, dp_rank: int, dp_world_size: int) -> StreamLayout:
    """`data.streams` (0 = the largest divisor of the global batch <= max(64, D) that D divides)."""
    if requested:
        streams = requested
    else:
        cap = max(AUTO_MAX_STREAMS, dp_world_size)
        streams = max(
            (
                s
                for s in range(dp_world_size, min(cap, global_windows) + 1, dp_world_size)
                if global_windows % s == 0
            ),
            default=0,
        )
        if streams == 0:
            raise ConfigError(
                f"data.streams: no stream count divides the global batch of {global_windows} sequences and "
                f"is a multiple of the {dp_world_size} data-parallel ranks; set training.global_batch_size"
            )
    if global_windows % streams:
        raise ConfigError(
            f"data.streams={streams} must divide the global batch of {global_windows} sequences (each stream "
            "gives the same number of sequences per step)"
        )
    if streams % dp_world_size:
        raise ConfigError(
            f"data.streams={streams} must be a multiple of the {dp_world_size} data-parallel ranks (a rank "
            "reads whole streams)"
        )
    return StreamLayout(streams, global_windows // streams, dp_rank, dp_world_size)


def choose_workers(requested: int, streams_per_rank: int) -> int:
    """Worker processes for one rank: at most `requested`, and a divisor of the rank's stream count so every
    worker makes the same chunks per step. -1 = auto: the CPUs this rank has to spare, at most 4. On a GPU
    machine that is all but one; on CPU, what torch's threads leave (a worker would compete with the model
    for cores, for no gain measured on CPU: docs/benchmarks.md, "Data loader workers")."""
    if requested < 0:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = 1 if torch.cuda.is_available() else torch.get_num_threads()
        requested = min(AUTO_MAX_WORKERS, usable // local_ranks - busy)
    return max(
        (w for w in range(1, streams_per_rank + 1) if streams_per_rank % w == 0 and w <= requested), default=0
    )


class StreamChunks(IterableDataset):
    """Yields {stream, windows [k, seq_len + 1], state after them} for this process's streams, in turn."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        *,
        layout: StreamLayout,
        states: dict[int, dict[str, Any]],
        width: int,
        seed: int,
        shuffle_buffer: int,
        repeat: bool,
    ) -> None:
        self.source, self.tokenizer, self.layout, self.states = source, tokenizer, layout, states
        self.width, self.seed, self.shuffle_buffer, self.repeat = width, seed, shuffle_buffer, repeat

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._chunks()
        except Exception as e:  # DataLoader would re-raise it with the worker's traceback as the message
            if get_worker_info() is None:
                raise
            yield {"error": e}  # re-raised as it is by the training process (PretrainLoader)

    def _chunks(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.layout.mine[info.id :: info.num_workers] if info else self.layout.mine
        streams = [
            PackedStream(
                self.source,
                self.tokenizer,
                stream=j,
                num_streams=self.layout.num_streams,
                state=self.states[j],
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
                repeat=self.repeat,
            )
            for j in mine
        ]
        while True:
            for stream in streams:
                windows = [stream.next_window(self.width) for _ in range(self.layout.windows_per_chunk)]
                if any(w is None for w in windows):  # a finite stream is over: so is the run's data
                    return
                yield {
                    "stream": stream.stream,
                    "windows": np.stack(windows),
                    "state": stream.state(),
                    "read": stream.stats.state_dict(),  # documents read so far, the block ahead included
                }


class PretrainLoader:
    """Micro-batches of this rank's share of each global batch; resumable under any rank count."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        *,
        layout: StreamLayout,
        seq_len: int,
        micro_batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        repeat: bool,
        fingerprint: dict[str, Any],
    ) -> None:
        per_rank = len(layout.mine) * layout.windows_per_chunk
        if per_rank % micro_batch_size:
            raise ConfigError(
                f"training.micro_batch_size={micro_batch_size} must divide a rank's {per_rank} sequences"
            )
        self.source, self.tokenizer, self.layout = source, tokenizer, layout
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.num_workers = choose_workers(num_workers, len(layout.mine))
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat
        self.fingerprint = fingerprint
        self.dp_rank, self.dp_world_size = layout.dp_rank, layout.dp_world_size
        self._positions = {j: initial_stream_state() for j in layout.mine}
        self._consumed = 0  # micro-batches of the step in progress already handed out
        self._read: dict[int, dict[str, Any]] = {}

    def doc_stats(self) -> DocStats:
        """Good and bad documents this rank's streams have read so far (blocks read ahead included)."""
        total = DocStats()
        for read in self._read.values():
            total.good += read["good"]
            for reason, n in read["bad"].items():
                total.bad[reason] = total.bad.get(reason, 0) + n
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        mine, skip = self.layout.mine, self._consumed
        dataset = StreamChunks(
            self.source,
            self.tokenizer,
            layout=self.layout,
            states=copy.deepcopy(self._positions),
            width=self.seq_len + 1,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            repeat=self.repeat,
        )
        workers = self.num_workers
        chunks = iter(
            TorchDataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                # a whole step's chunks ahead of the one being trained on
                prefetch_factor=max(2, 2 * len(mine) // workers) if workers else None,
                # its own generator: starting workers must not draw from the global torch RNG
                generator=torch.Generator().manual_seed(self.seed),
                worker_init_fn=quiet_lost_connections,  # a worker outlived by its parent ends quietly
            )
        )
        mb = self.micro_batch_size
        while True:
            step: dict[int, dict[str, Any]] = {}
            for _ in mine:
                chunk = next(chunks, None)
                if chunk is None:
                    return
                if "error" in chunk:
                    raise chunk["error"]
                step[int(chunk["stream"])] = chunk
                self._read[int(chunk["stream"])] = chunk["read"]
            windows = np.concatenate([np.asarray(step[j]["windows"]) for j in mine])
            n_micro = len(windows) // mb
            for i in range(skip, n_micro):
                self._consumed = (i + 1) % n_micro
                if self._consumed == 0:
                    self._positions = {j: step[j]["state"] for j in mine}
                yield windows_to_batch(list(windows[i * mb : (i + 1) * mb]))
            skip = 0

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": STATE_KIND,
            "num_streams": self.layout.num_streams,
            "dp_world_size": self.dp_world_size,
            "consumed_sequences": self._consumed * self.micro_batch_size,
            "fingerprint": dict(self.fingerprint),
            "streams": {str(j): copy.deepcopy(s) for j, s in self._positions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise DataError(
                "data loader state: not a pretraining stream position (saved by a finetuning regime, or by "
                "titan_mem before data.streams existed: start a new run from the weights with "
                "checkpoint.initial_load_path)"
            )
        saved_streams = state.get("num_streams")
        if saved_streams != self.layout.num_streams:
            raise DataError(
                f"data loader state was saved with data.streams={saved_streams} but this run has "
                f"data.streams={self.layout.num_streams}; set --data.streams={saved_streams} to continue it"
            )
        check_fingerprint(state.get("fingerprint", {}), self.fingerprint)
        consumed = int(state.get("consumed_sequences", 0))
        if consumed and (
            state.get("dp_world_size") != self.dp_world_size or consumed % self.micro_batch_size
        ):
            raise DataError(
                "data loader state was saved in the middle of an optimizer step: resume it with the same "
                "data-parallel degree and micro-batch size"
            )
        streams = state.get("streams", {})
        missing = [j for j in self.layout.mine if str(j) not in streams]
        if missing:
            raise DataError(f"data loader state has no position for streams {missing} of this rank")
        self._positions = {
            j: check_stream_state(streams[str(j)], f"data loader state stream {j}") for j in self.layout.mine
        }
        self._consumed = consumed // self.micro_batch_size


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a position saved under other data settings, naming the first setting that differs."""
    for key, value in saved.items():
        if current.get(key) != value:
            raise DataError(
                f"data loader state was saved with {key}={value!r} but this run has "
                f"{key}={current.get(key)!r}; the saved position does not apply"
            )


def merge_positions(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One pretraining state holding every saved rank's streams: what a resized run's ranks pick from."""
    if any(not isinstance(s, dict) or s.get("kind") != STATE_KIND for s in states):
        raise DataError(
            "data loader state: only pretraining positions can move to another number of ranks; resume a "
            "finetuning run with the data-parallel degree it was saved with"
        )
    if any(s.get("consumed_sequences", 0) for s in states):
        raise DataError(
            "data loader state was saved in the middle of an optimizer step: resume it with the same "
            "data-parallel degree"
        )
    merged = copy.deepcopy(states[0])
    for other in states[1:]:
        merged["streams"].update(copy.deepcopy(other["streams"]))
    return merged
