"""Rows of local record files (.jsonl / .json / .csv / .parquet, optionally .gz) and HF hub datasets, as
dicts: what the QA, evaluation and chat loaders read their examples from."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from titan_mem.errors import DataError, MissingFileError


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json / .csv / .parquet file (optionally .gz), as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"no such file: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    name = name.removesuffix(".gz")
    text = raw.decode("utf-8")
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    if name.endswith((".jsonl", ".json", ".ndjson")):
        if text.lstrip().startswith("["):
            return json.loads(text)
        out = []
        for i, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+0085 occurs in text
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{path}:{i}: invalid JSON line ({e})") from None
        return out
    raise DataError(f"unsupported file type {path} (expected .jsonl, .json, .csv or .parquet)")


def load_records(source: str, *, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    """Local file records, or a HF hub dataset's rows (non-streaming, evaluation sets are small)."""
    if _is_local(source):
        return read_records(source)
    if source.startswith((".", "/", "~")) or Path(source).suffix in (
        ".jsonl",
        ".json",
        ".csv",
        ".parquet",
        ".gz",
    ):
        raise MissingFileError(f"no such file: {source} (nor is it a HF dataset name)")
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:
        raise DataError(
            f"cannot open {source!r} as a local file or HF dataset: {type(e).__name__}: {e}"
        ) from e
