"""Data pipeline: tokenizers, pretraining streams, the embedded synthetic corpus, finetuning regimes.

The trainer needs only `TokenizerConfig` / `DataConfig` (the `[tokenizer]` / `[data]` config sections),
`build_tokenizer` and `build_dataloader`.
"""

from titan_mem.data.config import DataConfig, TokenizerConfig
from titan_mem.data.loader import DataLoader, build_dataloader
from titan_mem.data.records import FactExample, GSM8KExample, MultipleChoiceExample, QAExample
from titan_mem.data.tokenizer import Tokenizer, build_tokenizer, padded_vocab_size

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
