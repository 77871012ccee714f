"""What every document source shares: bad-document accounting, the reader protocol, and the rule that
deals files to streams (local files and HF data files are split the same way)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

logger = logging.getLogger("titan_mem.data")

BAD_REASONS = ("missing_field", "not_text", "empty", "invalid_utf8", "invalid_json")


class BadDoc(NamedTuple):
    reason: str
    where: str


class DocStats:
    """Counts good and bad documents; warns on the first bad ones, then at every power of ten."""

    def __init__(self) -> None:
        self.good = 0
        self.bad = dict.fromkeys(BAD_REASONS, 0)

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, doc: BadDoc) -> None:
        self.bad[doc.reason] = self.bad.get(doc.reason, 0) + 1
        n = self.n_bad
        if n <= 10 or (n & (n - 1) == 0):  # first ten, then 16, 32, 64, ...
            logger.warning(
                "skipping bad document (%s) at %s; %d bad so far: %s", doc.reason, doc.where, n, self.bad
            )

    def state_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.good = int(state["good"])
        self.bad = {**dict.fromkeys(BAD_REASONS, 0), **{k: int(v) for k, v in state["bad"].items()}}


def check_text(value: Any, where: str) -> str | BadDoc:
    """The text of a record, or why it is unusable."""
    if value is None:
        return BadDoc("missing_field", where)
    if not isinstance(value, str):
        return BadDoc("not_text", where)
    if not value.strip():
        return BadDoc("empty", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: tiktoken cannot encode them
        return BadDoc("invalid_utf8", where)
    return value


class DocReader(Protocol):
    def __iter__(self) -> Iterator[str | BadDoc]: ...

    def position(self) -> dict[str, Any]:
        """Where the next document comes from: after the last one yielded."""
        ...


class DocumentSource(Protocol):
    description: str

    def open(self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None) -> DocReader: ...


def epoch_file_order(n_files: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order files are dealt to streams in an epoch: reshuffled per epoch when shuffling."""
    if not shuffle:
        return list(range(n_files))
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_files).tolist()


def assign_files(n_files: int, shard: int, num_shards: int) -> list[tuple[int, int, int]]:
    """(file index, sharers, which) for each file shard `shard` reads: it keeps the records r with
    r % sharers == which. Files 0 .. F - F mod S go whole, round-robin; remainder file i is shared by
    the shards s with s % (F mod S) == i."""
    full = n_files // num_shards * num_shards
    files = [(i, 1, 0) for i in range(shard, full, num_shards)]
    rest = n_files - full
    if rest:
        slot = shard % rest
        files.append((full + slot, len(range(slot, num_shards, rest)), shard // rest))
    return files
