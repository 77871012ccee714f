"""Sparse memory finetuning pieces: slot access counts, slot scores, row-sparse optimizers."""

from titan_mem.sparse.counts import (
    BackgroundCounts,
    SlotBackground,
    SlotCounter,
    check_counts_batch_shape,
    count_slots,
    load_background_counts,
    merge_counts,
    save_background_counts,
)
from titan_mem.sparse.select import KL_EPS, RANKINGS, select_slots, slot_scores
from titan_mem.sparse.update import RowSparseAdamW, RowSparseSGD

__all__ = [
    "KL_EPS",
    "RANKINGS",
    "BackgroundCounts",
    "RowSparseAdamW",
    "RowSparseSGD",
    "SlotBackground",
    "SlotCounter",
    "check_counts_batch_shape",
    "count_slots",
    "load_background_counts",
    "merge_counts",
    "save_background_counts",
    "select_slots",
    "slot_scores",
]
