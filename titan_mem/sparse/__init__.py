"""Sparse memory finetuning pieces: slot access counts, slot scores, row-sparse optimizers."""

from titan_mem.sparse.counts import (
    BackgroundCounts,
    SlotCounter,
    check_counts_batch_shape,
    count_slots,
    load_background_counts,
    merge_counts,
    save_background_counts,
)
from titan_mem.sparse.row_optim import RowSparseAdamW, RowSparseSGD
from titan_mem.sparse.scores import KL_EPS, RANKINGS, SlotBackground, select_slots, slot_scores

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
