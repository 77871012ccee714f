"""Document sources: local files, HF `datasets`, or the synthetic corpus, as a resumable stream of texts.

Every source answers one question: "give me the documents of shard s of S in epoch e, starting at
position p", and reports its position as a small JSON-able dict. That position is all the data loader
stores to resume exactly (no buffers of text in the checkpoint).

Sharding: local files are split by file when the file count divides evenly by the shard count (each
rank reads only its files), else by record (rank r keeps records r, r+S, ... of the common stream); HF
datasets use `split_dataset_by_node` (the same rule, by HF shards); the synthetic stream is split by
document index. In every case the shards are disjoint and together cover the stream.

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
from typing import Any, NamedTuple, Protocol

import numpy as np

from titan_mem.data.config import DataConfig

logger = logging.getLogger("titan_mem.data")

BAD_REASONS = ("missing_field", "not_text", "empty", "invalid_utf8", "invalid_json")
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


class DocReader(Protocol):
    def __iter__(self) -> Iterator[str | BadDoc]: ...

    def position(self) -> dict[str, Any]:
        """Where the next document comes from: after the last one yielded."""
        ...


class DocumentSource(Protocol):
    description: str

    def open(self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None) -> DocReader: ...


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
            raise ValueError(
                f"data.source: unsupported file type {path} (use .jsonl/.json[.gz|.zst], .parquet, .txt)"
            )
        return [path]
    if path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    elif _GLOB_CHARS & set(spec):
        candidates = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"data.source: no such file, directory or glob: {spec}")
    files = sorted(p for p in candidates if file_kind(p) is not None)
    if not files:
        raise FileNotFoundError(
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
        order = list(range(len(self.files)))
        if self.shuffle_files:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(order)).tolist()
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
        self.by_file = len(files) % num_shards == 0
        self.files = files[shard::num_shards] if self.by_file else files
        self.shard, self.num_shards = shard, num_shards
        position = position or {}
        self._file = int(position.get("file", 0))
        self._record = int(position.get("record", 0))
        self._seen = int(position.get("seen", 0))

    def position(self) -> dict[str, Any]:
        return {"file": self._file, "record": self._record, "seen": self._seen}

    def __iter__(self) -> Iterator[str | BadDoc]:
        while self._file < len(self.files):
            path = self.files[self._file]
            for doc in _iter_raw(path, self.src.text_field, self.src.text_split, self._record):
                self._record += 1
                if doc is None:
                    continue
                if not self.by_file:
                    mine = self._seen % self.num_shards == self.shard
                    self._seen += 1
                    if not mine:
                        continue
                yield doc
            self._file += 1
            self._record = 0


# ---- HF datasets -----------------------------------------------------------------------------------------
class HFSource:
    """A HF hub dataset (or builder such as 'json' with data_files), streamed; positions are HF states."""

    def __init__(
        self,
        name: str,
        *,
        config: str | None,
        data_files: list[str],
        split: str,
        streaming: bool,
        text_field: str,
    ) -> None:
        self.name, self.config, self.data_files = name, config, list(data_files)
        self.split, self.streaming, self.text_field = split, streaming, text_field
        self.description = f"hf:{name}" + (f" ({config})" if config else "")

    def load(self):
        import datasets

        kwargs: dict[str, Any] = {"data_files": self.data_files} if self.data_files else {}
        try:
            ds = datasets.load_dataset(
                self.name, self.config, split=self.split, streaming=self.streaming, **kwargs
            )
        except Exception as e:  # network, missing files, bad config: one line naming the source
            raise ValueError(
                f"data.source: cannot open HF dataset {self.description}: {type(e).__name__}: {e}"
            ) from e
        if not self.streaming:
            ds = ds.to_iterable_dataset()
        return ds

    def open(self, epoch: int, shard: int, num_shards: int, position: dict[str, Any] | None) -> _HFReader:
        ds = self.load()
        if num_shards > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
        if position:
            ds.load_state_dict(position["hf"])
        return _HFReader(ds, self.text_field, self.description)


class _HFReader:
    def __init__(self, ds: Any, text_field: str, description: str) -> None:
        self.ds, self.text_field, self.description = ds, text_field, description
        self._count = 0

    def position(self) -> dict[str, Any]:
        return {"hf": self.ds.state_dict()}

    def __iter__(self) -> Iterator[str | BadDoc]:
        # `.iter(batch_size=1)` rather than `iter(ds)`: inside a DataLoader worker `iter(ds)` would split
        # the shards among workers a second time (ours are already split by rank x worker).
        for batch in self.ds.iter(batch_size=1):
            self._count += 1
            value = batch[self.text_field][0] if self.text_field in batch else None
            yield check_text(value, f"{self.description} row {self._count}")


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
            raise FileNotFoundError(f"data.source: no such file, directory or glob: {cfg.source}")
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
    )
