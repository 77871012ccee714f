"""Data pipeline: tokenizers, pretraining streams, the embedded synthetic corpus, finetuning regimes.

The trainer needs only `TokenizerConfig` / `DataConfig` (the `[tokenizer]` / `[data]` config sections),
`build_tokenizer` and `build_dataloader`.

The names below load their module on first use (PEP 562): `titan_mem.config` imports this package for
the config sections, and must not pull in the data pipeline (tiktoken, and the libraries a data source
needs: torchdata, faker, datasets, zstandard), which an image that only trains a config may lack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from titan_mem.data.config import DataConfig, TokenizerConfig

if TYPE_CHECKING:
    from titan_mem.data.finetune_loader import DataLoader
    from titan_mem.data.loader import build_dataloader
    from titan_mem.data.records import FactExample, GSM8KExample, MultipleChoiceExample, QAExample
    from titan_mem.data.tokenizer import Tokenizer, build_tokenizer, padded_vocab_size

_LAZY = {
    "DataLoader": "titan_mem.data.finetune_loader",
    "build_dataloader": "titan_mem.data.loader",
    "FactExample": "titan_mem.data.records",
    "GSM8KExample": "titan_mem.data.records",
    "MultipleChoiceExample": "titan_mem.data.records",
    "QAExample": "titan_mem.data.records",
    "Tokenizer": "titan_mem.data.tokenizer",
    "build_tokenizer": "titan_mem.data.tokenizer",
    "padded_vocab_size": "titan_mem.data.tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DataConfig",
    "DataLoader",
    "FactExample",
    "GSM8KExample",
    "MultipleChoiceExample",
    "QAExample",
    "Tokenizer",
    "TokenizerConfig",
    "build_dataloader",
    "build_tokenizer",
    "padded_vocab_size",
]
