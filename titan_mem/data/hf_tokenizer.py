"""A Hugging Face model's own tokenizer (`tokenizer.json`, read by the `tokenizers` library) as a titan_mem
tokenizer beside tiktoken, with the model's chat template for instruction data.

A retrofitted HF model (Goyal et al. 2026) must see the token ids it was pretrained on, so its tokenizer
comes from its folder. The face is `data.tokenizer.Tokenizer`'s: `encode` treats special-token text as
plain text (a document cannot inject `<|im_end|>`), BOS/EOS/PAD come from `tokenizer_config.json` (BOS
falls back to EOS as in our convention; PAD may equal EOS: padding is positional, `token_mask`). The chat
template is Jinja, rendered in Jinja's immutable sandbox as `transformers` renders it, so a template loaded
from a model folder cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from titan_mem.data.special_ids import SpecialIds
from titan_mem.errors import ConfigError, DataError, MissingFileError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"  # where transformers 5 writes the chat template
# what an HF model folder's tokenizer is made of (copied on export)
TOKENIZER_FILES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE, "special_tokens_map.json", "generation_config.json",
)  # fmt: skip


HUB_PREFIX = "hf:"  # tokenizer.name = "hf:org/name": that hub model's tokenizer files


def hf_tokenizer_folder(name: str) -> Path | None:
    """The folder of an HF tokenizer that `tokenizer.name` names (a `tokenizer.json`, a folder, which must
    hold one, or `hf:org/name` on the hub); None when `name` is not one (a tiktoken name or file)."""
    if name.startswith(HUB_PREFIX):
        from titan_mem.data.hub import snapshot
        from titan_mem.errors import HubError

        try:
            return snapshot(name[len(HUB_PREFIX) :], TOKENIZER_FILES)
        except HubError as e:
            raise ConfigError(f"tokenizer.name: {e}") from None
    path = Path(name).expanduser()
    if path.name == TOKENIZER_JSON:
        return path.parent
    if path.is_dir():
        if not (path / TOKENIZER_JSON).is_file():
            raise MissingFileError(
                f"tokenizer file not found: {path / TOKENIZER_JSON} (tokenizer.name is a folder)"
            )
        return path
    return None


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(SpecialIds):
    """`tokenizers.Tokenizer` with titan_mem's tokenizer face (see the module docstring)."""

    def __init__(self, folder: Path, *, num_threads: int = 4) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ConfigError(f"tokenizer.name: {folder} is an HF tokenizer; the hf extra reads it") from None
        path = Path(folder) / TOKENIZER_JSON
        if not path.is_file():
            raise MissingFileError(f"tokenizer file not found: {path}")
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as e:  # the Rust core's parse error, as one line
            raise DataError(f"{path}: not a tokenizers file ({str(e).splitlines()[0][:200]})") from None
        self.backend.encode_special_tokens = True  # special-token text in a document stays text
        config_path = Path(folder) / TOKENIZER_CONFIG
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{config_path}: not valid JSON ({e})") from None
        self.name = str(folder)
        self.num_threads = num_threads
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._n_words = max(vocab.values()) + 1
        eos = _token_text(config.get("eos_token")) or next(
            (t for t in ("<|endoftext|>", "</s>", "<|end_of_text|>") if t in vocab), None
        )
        if eos is None or eos not in vocab:
            raise DataError(f"{config_path}: eos_token {eos!r} is not a token of {path}")
        self._eos_id = vocab[eos]
        bos, pad = _token_text(config.get("bos_token")), _token_text(config.get("pad_token"))
        self._bos_id = vocab.get(bos, self._eos_id) if bos else self._eos_id
        self._pad_id = vocab.get(pad, self._eos_id) if pad else self._eos_id
        self.special_tokens = {"bos_token": bos or eos, "eos_token": eos, "pad_token": pad or eos}
        self.add_bos = _adds_bos(self.backend, config, self._bos_id)
        self.chat_template: str | None = _chat_template(Path(folder), config)

    @property
    def n_words(self) -> int:
        return self._n_words

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many texts (the Rust core parallelises the batch itself)."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self._wrap(ids, bos, eos) for ids in out] if bos or eos else out

    def encode_special(self, text: str) -> list[int]:
        """Encode text whose special-token markup is meant (a rendered chat template)."""
        self.backend.encode_special_tokens = False
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = True

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the model's chat template (as `transformers`' apply_chat_template
        with tokenize=False renders it)."""
        if self.chat_template is None:
            raise DataError(f"{self.name}: no chat template ({CHAT_TEMPLATE} or {TOKENIZER_CONFIG})")
        return _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(name={self.name!r}, n_words={self.n_words}, eos={self.eos_id}, pad={self.pad_id})"
        )


def _adds_bos(backend: Any, config: dict[str, Any], bos_id: int) -> bool:
    """Whether the model reads a BOS first: `add_bos_token` where tokenizer_config.json says, else whether
    tokenizer.json's post-processor puts one in (as `transformers` encodes with add_special_tokens)."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id and ids != backend.encode("a", add_special_tokens=False).ids


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The chat template: `chat_template.jinja` (transformers 5 writes it there), else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates whose `default` is the one)."""
    path = folder / CHAT_TEMPLATE
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _compiled(template: str) -> Any:
    """A chat template compiled in Jinja's immutable sandbox, with the helpers HF templates call."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
