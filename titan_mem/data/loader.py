"""`build_dataloader`: the one entry point the trainer calls, for every regime.

Pretraining returns a `streams.PretrainLoader`, whose position moves to any rank count. The finetuning
regimes return a torchdata `StatefulDataLoader` whose state also records the data-parallel layout;
loading a state saved under another dp world size (or rank, or worker count) raises a `ValueError` naming
both values, because their per-rank batches would no longer line up.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from titan_mem.data.config import DataConfig
from titan_mem.data.documents import DocumentSource
from titan_mem.data.qa import build_finetune_dataset
from titan_mem.data.sources import build_source
from titan_mem.data.streams import PretrainLoader, choose_layout
from titan_mem.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from titan_mem.data.finetune_loader import DataLoader

logger = logging.getLogger("titan_mem.data")


def build_dataloader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    global_batch_size: int | None = None,
    source: DocumentSource | None = None,
) -> DataLoader | PretrainLoader:
    """Resumable loader of this rank's {input_ids, labels, token_mask} batches [micro_batch_size, seq_len].

    `global_batch_size` (default micro_batch_size x dp_world_size, i.e. no gradient accumulation) is the
    optimizer step's sequences: pretraining splits it over `data.streams`; the finetuning regimes read one
    fact per optimizer step. `source`: the pretraining source when the caller already built it (the
    trainer does, to resolve a hub source's files once, `resolve_hf_files`).
    """
    cfg.validate()
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(
            f"dp_rank must be in [0, dp_world_size), got dp_rank={dp_rank}, dp_world_size={dp_world_size}"
        )
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
    # What the saved position depends on. A pretraining position is a token offset in each stream, valid
    # for any window shape and rank count; a finetuning position is a step index into fixed batches.
    fingerprint: dict[str, Any] = {
        "data.source": cfg.source,
        "data.regime": cfg.regime,
        "data.seed": cfg.seed,
        "data.shuffle_buffer": cfg.shuffle_buffer,
        "data.bucket_batches": cfg.bucket_batches,
        "tokenizer.name": tokenizer.name,
    }
    if cfg.source == "synthetic" or cfg.source_type == "synthetic":
        fingerprint["data.synthetic_*"] = (
            f"known={cfg.synthetic_known_people} new={cfg.synthetic_new_people} "
            f"population={cfg.population()} "
            f"documents={cfg.synthetic_documents} generic={cfg.synthetic_generic_fraction} "
            f"qa={cfg.synthetic_qa_fraction} paraphrases={cfg.synthetic_paraphrases}"
        )
    if cfg.regime == "pretrain":
        return PretrainLoader(
            source or build_source(cfg),
            tokenizer,
            layout=choose_layout(
                cfg.streams, global_batch_size or micro_batch_size * dp_world_size, dp_rank, dp_world_size
            ),
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            repeat=cfg.repeat,
            fingerprint=fingerprint,
        )
    dataset = build_finetune_dataset(
        cfg,
        tokenizer,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        global_batch_size=global_batch_size,
    )
    from titan_mem.data.finetune_loader import DataLoader  # imports torchdata: only a finetuning run needs it

    fingerprint["seq_len"] = seq_len
    fingerprint["micro_batch_size"] = micro_batch_size
    fingerprint["global_batch_size"] = global_batch_size or micro_batch_size * dp_world_size
    return DataLoader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        num_workers=max(0, cfg.num_workers),  # small, pre-built batches: auto means in-process
        seed=cfg.seed,
        fingerprint=fingerprint,
    )
