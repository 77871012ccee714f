"""The special-token ids every titan_mem tokenizer exposes (the convention: data/tokenizer.py's docstring)."""

from __future__ import annotations


class SpecialIds:
    """BOS / EOS / PAD ids and the `[BOS] ids [EOS]` wrapping; subclasses set the three ids."""

    _bos_id: int
    _eos_id: int
    _pad_id: int
    # Whether the model saw a BOS before every text in training; an HF tokenizer says (SmolLM2: no, Llama 3:
    # yes), titan_mem's own tokenizers always add one. A BOS the model never saw costs it (+0.08 nats/token
    # on NQ answers for SmolLM2-135M).
    add_bos: bool = True

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def prefix_ids(self) -> list[int]:
        """What precedes every text the model reads: `[BOS]` where its tokenizer adds one, else nothing."""
        return [self._bos_id] if self.add_bos else []

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """`bos=True` asks for the model's prefix (`prefix_ids`): a BOS only where the model adds one."""
        return (self.prefix_ids() if bos else []) + list(ids) + ([self._eos_id] if eos else [])
