"""The special-token ids every titan_mem tokenizer exposes (the convention: data/tokenizer.py's docstring)."""

from __future__ import annotations


class SpecialIds:
    """BOS / EOS / PAD ids and the `[BOS] ids [EOS]` wrapping; subclasses set the three ids."""

    _bos_id: int
    _eos_id: int
    _pad_id: int

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self._bos_id] if bos else []) + list(ids) + ([self._eos_id] if eos else [])
