"""One logical pretraining stream: documents -> tokens -> EOS-separated packed windows, resumable exactly.

Why blocks: documents are read in blocks of `shuffle_buffer` documents. A block is tokenized in one
batched call (fast) and shuffled with a seed derived from (seed, epoch, block, stream), so the shuffle
can be replayed. A stream's state is therefore tiny: the source position where the current block
starts, the block's number and epoch, and a token offset into it. Resuming re-reads one block and lands
on exactly the window the uninterrupted run would have produced next.

Each stream is shard `stream` of `num_streams` of the source and keeps its own epoch: a stream that runs
out starts its next epoch (reshuffled) without waiting for the others. How streams make global batches
is `data/streams.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

from titan_mem.data.documents import BadDoc, DocStats, DocumentSource
from titan_mem.data.packing import Block, WindowCutter, concat_with_eos
from titan_mem.data.tokenizer import Tokenizer
from titan_mem.errors import DataError, UserError

UNSHUFFLED_BLOCK_DOCS = 256  # documents tokenized per call when there is no shuffling
STREAM_STATE_KEYS = frozenset({"epoch", "block", "start", "offset", "stats"})


class EmptySourceError(UserError, ValueError):
    """The source (or one stream's shard of it) has no usable document: fail before training starts."""


def initial_stream_state() -> dict[str, Any]:
    return {"epoch": 0, "block": 0, "start": None, "offset": 0, "stats": DocStats().state_dict()}


def check_stream_state(state: Any, where: str) -> dict[str, Any]:
    if not isinstance(state, dict) or STREAM_STATE_KEYS - set(state):
        raise DataError(
            f"{where}: not a pretraining stream state (expected keys {sorted(STREAM_STATE_KEYS)})"
        )
    return state


class PackedStream:
    """Windows of `width` tokens (stride width - 1) from shard `stream` of `num_streams` of the source."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        *,
        stream: int,
        num_streams: int,
        state: dict[str, Any],
        seed: int,
        shuffle_buffer: int,
        repeat: bool,
    ) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.stream, self.num_streams = stream, num_streams
        self.seed, self.shuffle, self.repeat = seed, shuffle_buffer > 0, repeat
        self.block_docs = shuffle_buffer if shuffle_buffer > 0 else UNSHUFFLED_BLOCK_DOCS
        self.stats = DocStats()
        self.stats.load_state_dict(state["stats"])  # the head block is re-read and re-counted
        self._cutter = WindowCutter(
            self._blocks(state["epoch"], state["block"], state["start"]), state["offset"]
        )
        self._state = copy.deepcopy(state)

    def state(self) -> dict[str, Any]:
        """Where the next window starts (after the last one returned)."""
        return copy.deepcopy(self._state)

    def next_window(self, width: int) -> np.ndarray | None:
        """The next window, or None when a finite stream (repeat=False) is over."""
        window = self._cutter.next_window(width)
        if window is None:
            return None
        head = self._cutter.head
        assert head is not None  # a window always leaves its last token in a live block
        self._state = {
            "epoch": head.epoch,
            "block": head.index,
            "start": head.start,
            "offset": self._cutter.offset,
            "stats": head.stats,
        }
        return window

    def _tokenize(self, texts: list[str], epoch: int, index: int) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, index, self.stream, self.num_streams])
            texts = [texts[i] for i in rng.permutation(len(texts))]
        return concat_with_eos(self.tokenizer.encode_batch(texts), self.tokenizer.eos_id)

    def _blocks(self, epoch: int, index: int, start: dict[str, Any] | None) -> Iterator[Block]:
        while True:
            from_start, docs_in_epoch = start is None, 0
            reader = self.source.open(epoch, self.stream, self.num_streams, start)
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
                yield Block(epoch, index, start, before, self._tokenize(texts, epoch, index))
                index, start = index + 1, next_start
                if len(texts) < self.block_docs:
                    break
            if from_start and docs_in_epoch == 0:
                raise EmptySourceError(
                    f"data.source {self.source.description}: no usable documents in stream {self.stream} of "
                    f"{self.num_streams} (lower data.streams or add data); bad documents skipped: "
                    f"{self.stats.bad}"
                )
            if not self.repeat:
                return
            epoch, index, start = epoch + 1, 0, None
