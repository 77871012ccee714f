"""A GGUF file's tokenizer as the HF tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`) that `data.hf_tokenizer.HFTokenizer` and `transformers` read.

A GGUF stores the byte-level BPE's vocabulary, merges and token types, and names its pre-tokenizer
(`tokenizer.ggml.pre`): the regular expressions llama.cpp splits text with before BPE. The pre-tokenizer
decides the ids (SmolLM2's `smollm` splits every digit apart before GPT-2's expression; reading it as plain
ByteLevel, as `transformers` 5 does, gives other ids for numbers), so each supported name maps to the
`tokenizers` pre-tokenizer that splits text as llama.cpp does, and an unknown one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from titan_mem.errors import ConvertError

# GPT-2's expression (llama.cpp's `gpt2`; HF's ByteLevel(use_regex=True)) after splitting digits apart
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_GPT2 = ("gpt2", "mpt", "olmo", "jais")
# the splitting expressions of the original HF tokenizers that llama.cpp's names stand for
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPLIT = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
PRE_TOKENIZERS = (*_DIGITS_THEN_GPT2, *_GPT2, *_SPLIT)
# llama.cpp's token types: 3 control (special), 4 user-defined (added, not special)
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ConvertError(
        path, f"tokenizer.ggml.pre={pre!r}: not supported (known: {', '.join(PRE_TOKENIZERS)})"
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_files(reader: Any, path: Path, context_length: int) -> dict[str, str]:
    """The HF tokenizer files (name -> text) of the GGUF that `reader` reads."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(path, f"tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    pre_tokenizer = _pre_tokenizer("gpt2" if pre == "default" else pre, path)

    def special(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ConvertError(
                path, f"tokenizer.ggml.{key}_token_id={i}: not a token id (vocab {len(tokens)})"
            )
        return tokens[int(i)]

    bos, eos, pad, unk = special("bos"), special("eos"), special("padding"), special("unknown")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ConvertError(path, "tokenizer.ggml.add_bos/eos_token set without a bos/eos token id")

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(  # added first so their ids stay the GGUF's
        [AddedToken(t, special=ty == _CONTROL, normalized=False) for t, ty in zip(tokens, types)
         if ty in (_CONTROL, _USER_DEFINED)]
    )  # fmt: skip
    ends = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
    if add_bos or add_eos:
        ids = {t: tokens.index(t) for t in (bos, eos) if t is not None}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*ends[0], "$A:0", *ends[1]]),
            pair=" ".join([*ends[0], "$A:0", *ends[1], *ends[0], "$B:1", *ends[1]]),
            special_tokens=list(ids.items()),
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}, indent=2),
    }
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str):
        files["chat_template.jinja"] = template
    return files
