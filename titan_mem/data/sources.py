"""Document sources: local files, HF `datasets`, or the synthetic corpus, as a resumable stream of texts.

Every source answers one question: "give me the documents of shard s of S in epoch e, starting at
position p", and reports its position as a small JSON-able dict. That position is all the data loader
stores to resume exactly (no buffers of text in the checkpoint).

Sharding (a shard is one logical stream, `data/streams.py`): local files are dealt whole, round-robin,
as far as they go evenly (`assign_files`); each of the F mod S remaining files is shared by the shards
congruent to it and split among them record by record, so a shard reads at most one file it does not
own whole and nobody reads everything. HF datasets use `split_dataset_by_node` over the files rank 0
resolved; the synthetic stream is split by document index. In every case the shards are disjoint and
together cover the stream.

A bad document (missing field, not a string, empty, invalid UTF-8, invalid JSON line) is yielded as a
`BadDoc`; the consumer counts it (`DocStats`) and warns, so a long run never dies on one broken record.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from titan_mem.data.config import DataConfig
from titan_mem.data.documents import (
    BadDoc,
    DocumentSource,
    assign_files,
    check_text,
    epoch_file_order,
)
from titan_mem.data.hf_source import HFSource
from titan_mem.errors import ConfigError, MissingFileError

logger = logging.getLogger("titan_mem.data")

_KINDS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_GLOB_CHARS = set("*?[")


def parse_json_record(line: bytes, text_field: str, where: str) -> str | BadDoc:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return BadDoc("invalid_utf8", where)
    except ValueError:
        return BadDoc("invalid_json", where)
    if not isinstance(record, dict):
        return BadDoc("missing_field", where)
    return check_text(record.get(text_field), where)


# ---- local files -----------------------------------------------------------------------------------------
def file_kind(path: Path) -> tuple[str, str | None] | None:
    """('json' | 'parquet' | 'text', compression) from the file name, or None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSION.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = _KINDS.get(suffixes[-1]) if suffixes else None
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (recursively) or a glob, as a sorted list of supported data files."""
    path = Path(spec).expanduser()
    if path.is_file():
        if file_kind(path) is None:
            raise ConfigError(
                f"data.source: unsupported file type {path} (use .jsonl/.json[.gz|.zst], .parquet, .txt)"
            )
        return [path]
    if path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    elif _GLOB_CHARS & set(spec):
        candidates = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    else:
        raise MissingFileError(f"data.source: no such file, directory or glob: {spec}")
    files = sorted(p for p in candidates if file_kind(p) is not None)
    if not files:
        raise MissingFileError(
            f"data.source: no data files (.jsonl, .json[.gz|.zst], .parquet, .txt) in {spec}"
        )
    return files


def _open_binary(path: Path, compression: str | None) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(
                open(path, "rb"), read_across_frames=True, closefd=True
            )
        )
    return open(path, "rb")


def _iter_raw(path: Path, text_field: str, text_split: str, skip: int) -> Iterator[str | BadDoc | None]:
    """Records of one file after the first `skip`: text, BadDoc, or None (a blank line: no record)."""
    kind, compression = file_kind(path) or ("", None)
    if kind == "parquet":
        yield from _iter_parquet(path, text_field, skip)
        return
    with _open_binary(path, compression) as f:
        if kind == "json":
            head = f.peek(64)[:64].lstrip() if hasattr(f, "peek") else b""
            if head.startswith(b"["):  # a JSON array of records rather than JSON lines
                yield from _iter_json_array(path, f.read(), text_field, skip)
                return
            for i, line in enumerate(f):
                if i < skip:
                    continue
                yield parse_json_record(line, text_field, f"{path}:{i + 1}") if line.strip() else None
        elif text_split == "file":
            if skip == 0:
                yield _decode(f.read(), f"{path}")
        else:
            chunks = f if text_split == "line" else _paragraphs(f)
            for i, chunk in enumerate(chunks):
                if i < skip:
                    continue
                chunk = chunk.rstrip(b"\r\n") if text_split == "line" else chunk
                yield _decode(chunk, f"{path}:{i + 1}") if chunk.strip() else None


def _decode(data: bytes, where: str) -> str | BadDoc:
    try:
        return check_text(data.decode("utf-8"), where)
    except UnicodeDecodeError:
        return BadDoc("invalid_utf8", where)


def _paragraphs(f: io.BufferedIOBase) -> Iterator[bytes]:
    """Blank-line separated blocks of lines (the record index of a file counts these blocks)."""
    block: list[bytes] = []
    for line in f:
        if line.strip():
            block.append(line)
        elif block:
            yield b"".join(block).rstrip(b"\r\n")
            block = []
    if block:
        yield b"".join(block).rstrip(b"\r\n")


def _iter_json_array(path: Path, data: bytes, text_field: str, skip: int) -> Iterator[str | BadDoc]:
    try:
        records = json.loads(data)
    except ValueError:
        yield BadDoc("invalid_json", str(path))
        return
    for i, record in enumerate(records[skip:], start=skip):
        where = f"{path}[{i}]"
        yield (
            check_text(record.get(text_field), where)
            if isinstance(record, dict)
            else BadDoc("missing_field", where)
        )


def _iter_parquet(path: Path, text_field: str, skip: int) -> Iterator[str | BadDoc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        for i in range(skip, pf.metadata.num_rows):
            yield BadDoc("missing_field", f"{path}#{i}")
        return
    row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row + n > skip:  # row groups wholly before the resume point are not read at all
            values = pf.read_row_group(rg, columns=[text_field]).column(0).to_pylist()
            for j in range(max(0, skip - row), n):
                yield check_text(values[j], f"{path}#{row + j}")
        row += n


class LocalFileSource:
    """JSON lines (plain, .gz, .zst), JSON arrays, parquet and plain-text files."""

    def __init__(
        self, spec: str, *, text_field: str = "text", text_split: str = "file", shuffle_files: bool, seed: int
    ) -> None:
        self.files = resolve_files(spec)
        self.description = spec
        self.text_field, self.text_split = text_field, text_split
        self.shuffle_files, self.seed = shuffle_files, seed

    def open(self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None) -> _LocalReader:
        order = epoch_file_order(len(self.files), self.seed, epoch, self.shuffle_files)
        return _LocalReader(self, [self.files[i] for i in order], shard, num_shards, position)


class _LocalReader:
    def __init__(
        self,
        src: LocalFileSource,
        files: list[Path],
        shard: int,
        num_shards: int,
        position: dict[str, Any] | None,
    ) -> None:
        self.src = src
        self.plan = [
            (files[i], sharers, which) for i, sharers, which in assign_files(len(files), shard, num_shards)
        ]
        position = position or {}
        self._file = int(position.get("file", 0))
        self._record = int(position.get("record", 0))
        self._seen = int(position.get("seen", 0))  # records of a shared file passed so far (yours or not)

    def position(self) -> dict[str, Any]:
        return {"file": self._file, "record": self._record, "seen": self._seen}

    def __iter__(self) -> Iterator[str | BadDoc]:
        while self._file < len(self.plan):
            path, sharers, which = self.plan[self._file]
            for doc in _iter_raw(path, self.src.text_field, self.src.text_split, self._record):
                self._record += 1
                if doc is None:
                    continue
                mine = self._seen % sharers == which
                self._seen += 1
                if mine:
                    yield doc
            self._file += 1
            self._record = self._seen = 0


# ---- synthetic -------------------------------------------------------------------------------------------
class SyntheticSource:
    """The embedded corpus: document k is a pure function of (seed, k), so the position is one index."""

    def __init__(self, cfg: DataConfig) -> None:
        from titan_mem.data.synthetic import world_of

        self.world = world_of(cfg)
        self.population = cfg.population()
        self.generic_fraction = cfg.synthetic_generic_fraction
        self.qa_fraction = cfg.synthetic_qa_fraction
        self.n_documents = cfg.synthetic_documents
        self.description = f"synthetic(seed={cfg.seed}, population={self.population})"

    def open(
        self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None
    ) -> _SyntheticReader:
        return _SyntheticReader(self, shard if position is None else int(position["doc"]), num_shards)


class _SyntheticReader:
    def __init__(self, src: SyntheticSource, start: int, step: int) -> None:
        self.src, self._next, self.step = src, start, step

    def position(self) -> dict[str, Any]:
        return {"doc": self._next}

    def __iter__(self) -> Iterator[str]:
        src = self.src
        while src.n_documents == 0 or self._next < src.n_documents:
            k = self._next
            self._next += self.step
            yield src.world.document(
                k,
                population=src.population,
                generic_fraction=src.generic_fraction,
                qa_fraction=src.qa_fraction,
            )


def build_source(cfg: DataConfig) -> DocumentSource:
    """Pick the source for `cfg.source`; local paths are checked here so a typo fails before training."""
    kind = cfg.source_type
    if kind == "auto":
        if cfg.source == "synthetic":
            kind = "synthetic"
        elif Path(cfg.source).expanduser().exists() or (_GLOB_CHARS & set(cfg.source)):
            kind = "local"
        elif cfg.source.startswith((".", "/", "~")) or Path(cfg.source).suffix in (*_KINDS, *_COMPRESSION):
            raise MissingFileError(f"data.source: no such file, directory or glob: {cfg.source}")
        else:
            kind = "hf"
    if kind == "synthetic":
        return SyntheticSource(cfg)
    if kind == "local":
        return LocalFileSource(
            cfg.source,
            text_field=cfg.text_field,
            text_split=cfg.text_split,
            shuffle_files=cfg.shuffle_buffer > 0,
            seed=cfg.seed,
        )
    return HFSource(
        cfg.source,
        config=cfg.hf_config,
        data_files=cfg.hf_data_files,
        split=cfg.split,
        streaming=cfg.streaming,
        text_field=cfg.text_field,
        shuffle_files=cfg.shuffle_buffer > 0,
        seed=cfg.seed,
    )
