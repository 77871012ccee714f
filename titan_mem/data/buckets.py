"""Finetuning batches with little padding: rows of like length share a batch, padded only to the longest.

QA rows are short and uneven: TriviaQA's `[BOS] Question: q\\nAnswer: a [EOS]` with SmolLM2's tokenizer is 28
tokens on average, 92 at most, so a 16 x 64 batch is 56 % padding (docs/benchmarks.md). Packing several rows
into one sequence would need attention that stops at row boundaries on the training path, which the causal
forward does not take; bucketing keeps one row per sequence, so every real token computes exactly what it
did before (right padding, causal attention) and the sparse selection (slots the batch's real tokens read,
padding excluded; Lin et al. 2025, sec. 3) keeps its meaning. What changes is which rows share a batch.

Both functions are pure in their arguments (the epoch's order, seeded by (seed, epoch)), so a batch is still a
function of the step and a resumed run reads the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from titan_mem.data.packing import Row


def empty_row(pad_id: int) -> Row:
    """A row of padding only (no real token, no target): fills a bucketed epoch's last, short batch, so
    that every row appears exactly once per epoch and each rank still gets whole micro-batches."""
    return Row((pad_id,), (False,))


def padded_length(rows: Sequence[Row], seq_len: int, multiple: int) -> int:
    """Input length of a batch of `rows`: `seq_len` when `multiple` is 0 (fixed shape), else the longest
    row's inputs (tokens - 1) rounded up to a multiple of `multiple`, at most `seq_len`.

    Called with an optimizer step's rows (every rank and micro-batch), so all of them share one shape: the
    memory-parallel exchange and the 1-rank = N-rank equivalence see the same tensors."""
    if multiple <= 0:
        return seq_len
    longest = max((len(r.tokens) - 1 for r in rows), default=1)
    return max(1, min(seq_len, -(-longest // multiple) * multiple))


def bucketed_batches(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    pool_batches: int,
    rng: np.random.Generator | None,
) -> list[np.ndarray]:
    """One epoch's batches of row indices, rows of like length together.

    `order` (the epoch's, already shuffled, row order) is cut into pools of `pool_batches` x `batch_size`
    rows; each pool is sorted by `lengths` (stable, so ties keep the shuffled order) and cut into batches;
    then `rng` shuffles the epoch's batches (None keeps them in pool order). A larger pool pads less and
    mixes less (fairseq and HF's `group_by_length` take pools of about 50 batches). Every row is in
    exactly one batch; only the last pool's last batch can be short.
    """
    if batch_size < 1 or pool_batches < 1:
        raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
    pool = batch_size * pool_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        part = order[start : start + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BucketPlan:
    """epoch -> that epoch's length-bucketed batches of row ids: `bucketed_batches` of `order(epoch)`, the
    batches shuffled with (seed, epoch) unless `seed` is None. Only the last epoch's plan is kept."""

    def __init__(
        self,
        order: Callable[[int], np.ndarray],
        lengths: np.ndarray,
        batch_size: int,
        pool_batches: int,
        seed: int | None,
    ) -> None:
        self.order, self.lengths, self.seed = order, lengths, seed
        self.batch_size, self.pool_batches = batch_size, pool_batches
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rng = None if self.seed is None else np.random.default_rng([self.seed, epoch, 0xB0C7])
            batches = bucketed_batches(
                self.order(epoch), self.lengths, self.batch_size, self.pool_batches, rng
            )
            self._cache = (epoch, batches)
        return self._cache[1]
