"""Key/value cache for incremental decoding: each new token attends to the stored keys/values of earlier
positions instead of recomputing them, so a decoding step runs the blocks on the new token only, not on the
whole sequence again.

Only attention needs a cache: the memory layer and the FFN act on each token alone.

A plain class on purpose (not a dataclass or NamedTuple): FSDP2's forward hooks rebuild dataclasses and
named tuples found in a module's inputs (casting their tensors), which would silently drop the writes.
"""

from __future__ import annotations

import torch

from titan_mem.models.args import ModelArgs


class KVCache:
    """Per layer, keys and values [B, H_kv, max_len, head_dim] (GQA: H_kv = n_kv_heads), filled left to right.

    `length` counts the positions written (the same for every row: batched prompts are left-padded);
    `valid` [B, max_len] marks which of them are real tokens (pads are masked out of attention); `seen` [B]
    counts each row's real tokens, i.e. the RoPE position of its next token. A layer's buffers are allocated
    in full on its first write, in the dtype the block computes in (bf16 under FSDP mixed precision).
    """

    def __init__(
        self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, device=None
    ):
        self.batch_size, self.max_len = batch_size, max_len
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, args: ModelArgs, batch_size: int, max_len: int, device=None) -> KVCache:
        """A cache for `batch_size` rows of at most `max_len` positions (prompt + new tokens)."""
        if max_len > args.max_seq_len:
            raise ValueError(f"KVCache: max_len {max_len} exceeds the model's max_seq_len {args.max_seq_len}")
        return cls(args.n_layers, batch_size, max_len, args.kv_heads, args.head_dim, device)

    def repeat(self, batch_size: int, max_len: int) -> KVCache:
        """A new cache of `batch_size` rows, each starting with this 1-row cache's positions (a shared
        prompt prefix computed once, e.g. the few-shot exemplars every evaluated item begins with), room
        for `max_len` positions in all. This cache is left unchanged."""
        if self.batch_size != 1:
            raise ValueError(f"KVCache.repeat: needs a 1-row cache, this one holds {self.batch_size}")
        if max_len < self.length:
            raise ValueError(f"KVCache.repeat: max_len {max_len} is below the {self.length} cached positions")
        out = KVCache(len(self.keys), batch_size, max_len, self.n_kv_heads, self.head_dim, self.valid.device)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is None or v is None:
                raise ValueError(f"KVCache.repeat: layer {i} was never written")
            out.keys[i] = k.new_empty((batch_size, self.n_kv_heads, max_len, self.head_dim))
            out.values[i] = v.new_empty((batch_size, self.n_kv_heads, max_len, self.head_dim))
            out.keys[i][:, :, : self.length] = k[:, :, : self.length]
            out.values[i][:, :, : self.length] = v[:, :, : self.length]
        out.valid[:, : self.length] = self.valid[:, : self.length]
        out.seen[:] = self.seen
        out.length = self.length
        return out

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (indices, in that order): decoding drops the rows that are done."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and v is not None:
                self.keys[i], self.values[i] = k.index_select(0, rows), v.index_select(0, rows)
        self.valid, self.seen = self.valid.index_select(0, rows), self.seen.index_select(0, rows)
        self.batch_size = len(rows)

    def append(self, real: torch.Tensor) -> torch.Tensor:
        """Start a forward of `real.shape[1]` new positions (`real` [B, T]: True = not padding).

        Returns the key validity [B, length + T] the attention mask is built from. `advance` ends the forward.
        """
        b, t = real.shape
        if b != self.batch_size:
            raise ValueError(f"KVCache: batch of {b} rows, cache holds {self.batch_size}")
        if self.length + t > self.max_len:
            raise ValueError(f"KVCache: {self.length} + {t} positions exceed its max_len {self.max_len}")
        self.valid[:, self.length : self.length + t] = real
        return self.valid[:, : self.length + t]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new k, v [B, H_kv, T, head_dim]; return all of its keys/values so far."""
        if self.keys[layer] is None:
            shape = (self.batch_size, self.n_kv_heads, self.max_len, self.head_dim)
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, real: torch.Tensor) -> None:
        """End a forward: every layer has written its `real.shape[1]` new positions."""
        self.length += real.shape[1]
        self.seen += real.sum(1)
