"""`build_dataloader`: the one entry point the trainer calls, for every regime.

Pretraining returns a `streams.PretrainLoader`, whose position moves to any rank count. The finetuning
regimes return a torchdata `StatefulDataLoader` whose state also records the data-parallel layout;
loading a state saved under another dp world size (or rank, or worker count) raises a `ValueError` naming
both values, because their per-rank batches would no longer line up.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_mem.data.config import DataConfig
from titan_mem.data.documents import DocumentSource
from titan_mem.data.qa import build_finetune_dataset
from titan_mem.data.sources import build_source
from titan_mem.data.streams import PretrainLoader, check_fingerprint, choose_layout
from titan_mem.data.tokenizer import Tokenizer

logger = logging.getLogger("titan_mem.data")

STATE_VERSION = 1


class DataLoader(StatefulDataLoader):
    """StatefulDataLoader over a dataset that yields whole batches, aware of its data-parallel slot."""

    def __init__(
        self,
        dataset: Any,
        *,
        dp_rank: int,
        dp_world_size: int,
        num_workers: int,
        seed: int,
        fingerprint: dict[str, Any],
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(
                dataset,
                batch_size=None,  # the datasets yield complete batches
                num_workers=num_workers,
                # its own generator: creating an iterator must not draw from the global torch RNG,
                # or a resumed run's model RNG stream would differ from the uninterrupted run's
                generator=torch.Generator().manual_seed(seed),
            )
        self.dp_rank, self.dp_world_size, self.fingerprint = dp_rank, dp_world_size, fingerprint

    def __iter__(self):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.num_workers,
            "fingerprint": dict(self.fingerprint),
            "loader": super().state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "loader" not in state_dict:
            raise ValueError("data loader state: not a titan_mem data loader state (no 'loader' entry)")
        saved = state_dict.get("dp_world_size")
        if saved != self.dp_world_size:
            raise ValueError(
                f"data loader state was saved with dp_world_size={saved} but this run has "
                f"dp_world_size={self.dp_world_size}; resuming under a different data-parallel degree is "
                "not supported (the per-rank streams would change)"
            )
        if state_dict.get("dp_rank") != self.dp_rank:
            raise ValueError(
                f"data loader state belongs to dp_rank={state_dict.get('dp_rank')} but this loader is "
                f"dp_rank={self.dp_rank}"
            )
        if state_dict.get("num_workers") != self.num_workers:
            raise ValueError(
                f"data loader state was saved with data.num_workers={state_dict.get('num_workers')} "
                f"but this run has data.num_workers={self.num_workers}; keep the worker count when resuming"
            )
        check_fingerprint(state_dict.get("fingerprint", {}), self.fingerprint)
        super().load_state_dict(state_dict["loader"])


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
