"""Pretraining stream: documents -> tokens -> EOS-separated packed windows -> batches, resumable exactly.

Why blocks: documents are read in blocks of `shuffle_buffer` documents. A block is tokenized in one
batched call (fast) and shuffled with a seed derived from (seed, epoch, block, shard), so the shuffle
can be replayed. The loader's state is therefore tiny: the source position where the current block
starts, the block's number and epoch, and a token offset into it. Resuming re-reads one block and lands
on exactly the batch the uninterrupted run would have produced next.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from titan_mem.data.packing import Block, WindowCutter, concat_with_eos, windows_to_batch
from titan_mem.data.sources import BadDoc, DocStats, DocumentSource
from titan_mem.data.tokenizer import Tokenizer

UNSHUFFLED_BLOCK_DOCS = 256  # documents tokenized per call when there is no shuffling


class EmptySourceError(ValueError):
    """The source (or this rank's shard of it) has no usable document: fail before training starts."""


def worker_shard(dp_rank: int, dp_world_size: int) -> tuple[int, int]:
    """This process's shard of the stream: data-parallel rank x DataLoader worker."""
    info = get_worker_info()
    if info is None:
        return dp_rank, dp_world_size
    return dp_rank * info.num_workers + info.id, dp_world_size * info.num_workers


class PackedTextDataset(IterableDataset):
    """Yields ready batches {input_ids, labels, token_mask} of shape [batch_size, seq_len]."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        repeat: bool = True,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be in [0, dp_world_size), got {dp_rank} of {dp_world_size}")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seed, self.shuffle, self.repeat = seed, shuffle_buffer > 0, repeat
        self.block_docs = shuffle_buffer if shuffle_buffer > 0 else UNSHUFFLED_BLOCK_DOCS
        self.stats = DocStats()
        self._state: dict[str, Any] = {
            "epoch": 0,
            "block": 0,
            "start": None,
            "offset": 0,
            "stats": self.stats.state_dict(),
        }

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "block", "start", "offset", "stats"} - set(state)
        if missing:
            raise ValueError(
                f"pretraining data state is missing {sorted(missing)} (not a PackedTextDataset state)"
            )
        self._state = copy.deepcopy(state)
        self.stats.load_state_dict(state["stats"])

    # ---- stream ----------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], epoch: int, index: int, shard: int, num_shards: int) -> np.ndarray:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, index, shard, num_shards]).permutation(len(texts))
            texts = [texts[i] for i in perm]
        return concat_with_eos(self.tokenizer.encode_batch(texts), self.tokenizer.eos_id)

    def _blocks(self, epoch: int, index: int, start: dict[str, Any] | None) -> Iterator[Block]:
        shard, num_shards = worker_shard(self.dp_rank, self.dp_world_size)
        while True:
            from_start, docs_in_epoch = start is None, 0
            reader = self.source.open(epoch, shard, num_shards, start)
            docs = iter(reader)
            while True:
                before = self.stats.state_dict()
                texts: list[str] = []
                for doc in docs:
                    if isinstance(doc, BadDoc):
                        self.stats.add_bad(doc)
                        continue
                    texts.append(doc)
                    if len(texts) == self.block_docs:
                        break
                if not texts:
                    break
                next_start = reader.position()
                self.stats.good += len(texts)
                docs_in_epoch += len(texts)
                yield Block(
                    epoch, index, start, before, self._tokenize(texts, epoch, index, shard, num_shards)
                )
                index, start = index + 1, next_start
                if len(texts) < self.block_docs:
                    break
            if from_start and docs_in_epoch == 0:
                raise EmptySourceError(
                    f"data.source {self.source.description}: no usable documents for data-parallel rank "
                    f"{self.dp_rank} of {self.dp_world_size} (shard {shard} of {num_shards}); "
                    f"bad documents skipped: {self.stats.bad}"
                )
            if not self.repeat:
                return
            epoch, index, start = epoch + 1, 0, None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        state = self._state
        self.stats.load_state_dict(state["stats"])  # the head block is re-read and re-counted
        cutter = WindowCutter(self._blocks(state["epoch"], state["block"], state["start"]), state["offset"])
        width = self.seq_len + 1
        while True:
            windows = []
            for _ in range(self.batch_size):
                window = cutter.next_window(width)
                if window is None:  # finite stream (repeat=False) is over; the partial batch is dropped
                    return
                windows.append(window)
            head = cutter.head
            assert head is not None  # a window always leaves its last token in a live block
            self._state = {
                "epoch": head.epoch,
                "block": head.index,
                "start": head.start,
                "offset": cutter.offset,
                "stats": head.stats,
            }
            yield windows_to_batch(windows)
