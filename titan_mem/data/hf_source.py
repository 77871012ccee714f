"""HF `datasets` as a pretraining document source: data files resolved once, then dealt like local files.

Why resolve once: `load_dataset` on a hub name lists the repository through the hub API, and hundreds of
ranks doing it at once hit rate limits, while a node without internet would fail only after every rank
built the model. Rank 0 resolves the split's data files (`resolve_hf_files`, pinned to the revision the
hub returns) before the model is built, and the list is broadcast; each stream then opens only its files
with the packaged builder ('json', 'parquet', ...), dealt by `documents.assign_files` exactly like local
files. A dataset without data files (e.g. one the hub serves generated) falls back to every process
loading it and `split_dataset_by_node`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from titan_mem.data.documents import BadDoc, assign_files, check_text, epoch_file_order
from titan_mem.errors import ConfigError, DataError


class HFSource:
    """A HF hub dataset (or a builder such as 'json' with data_files), streamed; positions are HF states."""

    def __init__(
        self,
        name: str,
        *,
        config: str | None,
        data_files: list[str],
        split: str,
        streaming: bool,
        text_field: str,
        shuffle_files: bool = False,
        seed: int = 0,
    ) -> None:
        self.name, self.config, self.data_files = name, config, list(data_files)
        self.split, self.streaming, self.text_field = split, streaming, text_field
        self.shuffle_files, self.seed = shuffle_files, seed
        self.description = f"hf:{name}" + (f" ({config})" if config else "")
        self.resolved: dict[str, Any] | None = None  # set by resolve_hf_files, or on the first open

    def _error(self, e: Exception) -> ValueError:
        return ValueError(f"data.source: cannot open HF dataset {self.description}: {type(e).__name__}: {e}")

    def resolve(self) -> dict[str, Any]:
        """{'builder': packaged builder name, 'files': the split's data files}; files = [] when the dataset
        has none to list. Contacts the hub (call it on one rank)."""
        import datasets

        try:
            builder = datasets.load_dataset_builder(
                self.name, self.config, data_files=self.data_files or None
            )
        except Exception as e:  # network, missing files, bad config: one line naming the source
            raise self._error(e) from e
        files = (builder.config.data_files or {}).get(self.split)
        if files is None and builder.config.data_files:
            splits = ", ".join(sorted(builder.config.data_files))
            raise ConfigError(f"data.split: {self.description} has no split {self.split!r} (it has {splits})")
        return {"builder": builder.name, "files": [str(f) for f in files or []]}

    def _load(self, builder: str | None, files: list[str] | None):
        import datasets

        try:
            if builder is None:
                kwargs: dict[str, Any] = {"data_files": self.data_files} if self.data_files else {}
                ds = datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=self.streaming, **kwargs
                )
            else:
                ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=self.streaming)
        except Exception as e:
            raise self._error(e) from e
        return ds if self.streaming else ds.to_iterable_dataset()

    def open(self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None) -> _HFReader:
        if self.resolved is None:  # one process (a tool, a test): resolve here
            self.resolved = self.resolve()
        from datasets.distributed import split_dataset_by_node

        files = self.resolved["files"]
        if not files:
            ds = self._load(None, None)
            parts = [split_dataset_by_node(ds, rank=shard, world_size=num_shards) if num_shards > 1 else ds]
        else:
            order = epoch_file_order(len(files), self.seed, epoch, self.shuffle_files)
            plan = assign_files(len(files), shard, num_shards)
            builder = self.resolved["builder"]
            whole = [files[order[i]] for i, sharers, _ in plan if sharers == 1]
            parts = [self._load(builder, whole)] if whole else []
            for i, sharers, which in plan:
                if sharers > 1:  # the remainder file: split record by record among its sharers
                    ds = self._load(builder, [files[order[i]]])
                    parts.append(split_dataset_by_node(ds, rank=which, world_size=sharers))
        return _HFReader(parts, self.text_field, self.description, position)


class _HFReader:
    def __init__(self, parts: list[Any], text_field: str, description: str, position: dict[str, Any] | None):
        self.parts, self.text_field, self.description = parts, text_field, description
        self._part = int((position or {}).get("part", 0))
        if position and self._part < len(parts):
            parts[self._part].load_state_dict(position["hf"])
        self._count = 0

    def position(self) -> dict[str, Any]:
        state = self.parts[self._part].state_dict() if self._part < len(self.parts) else None
        return {"part": self._part, "hf": state}

    def __iter__(self) -> Iterator[str | BadDoc]:
        while self._part < len(self.parts):
            # `.iter(batch_size=1)` rather than `iter(ds)`: inside a DataLoader worker `iter(ds)` would split
            # the shards among workers a second time (ours are already split by stream).
            for batch in self.parts[self._part].iter(batch_size=1):
                self._count += 1
                value = batch[self.text_field][0] if self.text_field in batch else None
                yield check_text(value, f"{self.description} row {self._count}")
            self._part += 1


def resolve_hf_files(source: Any, is_rank0: bool, share: Any) -> None:
    """Rank 0 resolves a HF source's files, every rank gets the result (or rank 0's error, as one line)
    through `share` (a JSON broadcast) into `source.resolved`; other sources are left alone."""
    if not isinstance(source, HFSource):
        return
    result: dict[str, Any] = {}
    if is_rank0:
        try:
            result = {"ok": source.resolve()}
        except ValueError as e:
            result = {"error": str(e)}
    result = share(result)
    if "error" in result:
        raise DataError(result["error"])
    source.resolved = result["ok"]
