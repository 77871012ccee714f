"""Turning token ids into training tensors: packed windows for pretraining, padded rows for finetuning.

Packing: documents are joined with EOS into one stream and cut into windows of seq_len + 1 tokens with a
stride of seq_len, so inputs = window[:-1], labels = window[1:] and every token after the first is a
target exactly once. All packed tokens are real (token_mask all True).

Rows: a finetuning example is one row `[BOS] + tokens + [EOS]` with a per-token "is a target" flag,
truncated to seq_len + 1 and padded with PAD; labels are -100 wherever there is no target or padding,
and token_mask is False exactly on padding.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def concat_with_eos(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """One int64 array: each document followed by EOS (numpy, because Python lists are the bottleneck)."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    out = np.empty(total, dtype=np.int64)
    ends = np.cumsum(lengths) - 1
    is_text = np.ones(total, dtype=bool)
    is_text[ends] = False
    out[ends] = eos_id
    out[is_text] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=total - len(docs))
    return out


@dataclass
class Block:
    """Tokens of consecutive documents, with what is needed to re-create them on resume."""

    epoch: int
    index: int  # block number within the epoch (seeds its shuffle)
    start: dict[str, Any] | None  # source position of its first document
    stats: dict[str, Any]  # document counters before it was read
    tokens: np.ndarray = field(repr=False)


class WindowCutter:
    """Cuts windows of `width` tokens with stride `width - 1` from a stream of blocks.

    The cursor is (first block still needed, offset into it): a position that a checkpoint can hold
    because blocks are re-creatable from their `start`.
    """

    def __init__(self, blocks: Iterator[Block], offset: int = 0) -> None:
        self._blocks = blocks
        self._live: deque[Block] = deque()
        self._available = 0  # tokens in live blocks
        self.offset = offset

    @property
    def head(self) -> Block | None:
        return self._live[0] if self._live else None

    def _fill(self, need: int) -> bool:
        while self._available - self.offset < need:
            block = next(self._blocks, None)
            if block is None:
                return False
            self._live.append(block)
            self._available += len(block.tokens)
        return True

    def next_window(self, width: int) -> np.ndarray | None:
        """The next `width` tokens (None when a finite stream runs out), advancing by width - 1."""
        if not self._fill(width):
            return None
        parts, start, left = [], self.offset, width
        for block in self._live:
            if start >= len(block.tokens):
                start -= len(block.tokens)
                continue
            piece = block.tokens[start : start + left]
            parts.append(piece)
            left -= len(piece)
            start = 0
            if left == 0:
                break
        self.offset += width - 1
        while self._live and self.offset >= len(self._live[0].tokens):
            dropped = self._live.popleft()
            self.offset -= len(dropped.tokens)
            self._available -= len(dropped.tokens)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def windows_to_batch(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack(windows))
    return {
        "input_ids": arr[:, :-1].contiguous(),
        "labels": arr[:, 1:].contiguous(),
        "token_mask": torch.ones(arr.shape[0], arr.shape[1] - 1, dtype=torch.bool),
    }


@dataclass(frozen=True)
class Row:
    """A finetuning sequence; `targets[i]` says whether tokens[i] is trained on as a prediction."""

    tokens: tuple[int, ...]
    targets: tuple[bool, ...]


def make_row(prompt: Sequence[int], completion: Sequence[int], prefix: Sequence[int], eos_id: int) -> Row:
    """`prefix + prompt + completion + [EOS]` (prefix: the tokenizer's `prefix_ids()`, [BOS] or nothing),
    with loss on completion and EOS only."""
    tokens = (*prefix, *prompt, *completion, eos_id)
    targets = (False,) * (len(prefix) + len(prompt)) + (True,) * (len(completion) + 1)
    return Row(tokens, targets)


def rows_to_batch(rows: Sequence[Row], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad/truncate rows to seq_len inputs; labels -100 off-target, token_mask False on padding."""
    b = len(rows)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    token_mask = torch.zeros((b, seq_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        toks = torch.tensor(row.tokens[: seq_len + 1], dtype=torch.long)
        tgt = torch.tensor(row.targets[: seq_len + 1], dtype=torch.bool)
        n = len(toks) - 1
        input_ids[i, :n] = toks[:-1]
        labels[i, :n] = torch.where(tgt[1:], toks[1:], IGNORE_INDEX)
        token_mask[i, :n] = True
    return {"input_ids": input_ids, "labels": labels, "token_mask": token_mask}
