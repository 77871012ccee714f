"""The finetuning regimes' resumable loader: a torchdata `StatefulDataLoader` that knows its dp slot.

Its own module so that only a finetuning run imports torchdata (`loader.build_dataloader` imports it when
it builds one); the config, the dry run, the kernels and pretraining work on an image without torchdata.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_mem.data.streams import check_fingerprint
from titan_mem.errors import DataError, quiet_lost_connections

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
                worker_init_fn=quiet_lost_connections,  # a worker outlived by its parent ends quietly
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
            raise DataError("data loader state: not a titan_mem data loader state (no 'loader' entry)")
        saved = state_dict.get("dp_world_size")
        if saved != self.dp_world_size:
            raise DataError(
                f"data loader state was saved with dp_world_size={saved} but this run has "
                f"dp_world_size={self.dp_world_size}; resuming under a different data-parallel degree is "
                "not supported (the per-rank streams would change)"
            )
        if state_dict.get("dp_rank") != self.dp_rank:
            raise DataError(
                f"data loader state belongs to dp_rank={state_dict.get('dp_rank')} but this loader is "
                f"dp_rank={self.dp_rank}"
            )
        if state_dict.get("num_workers") != self.num_workers:
            raise DataError(
                f"data loader state was saved with data.num_workers={state_dict.get('num_workers')} "
                f"but this run has data.num_workers={self.num_workers}; keep the worker count when resuming"
            )
        check_fingerprint(state_dict.get("fingerprint", {}), self.fingerprint)
        super().load_state_dict(state_dict["loader"])
