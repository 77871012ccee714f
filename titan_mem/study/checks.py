"""Type checks of study-file values: each failure is one line naming the file and key. Types and choices
are checked by the trainer config's own rules (`config_fields.coerce`), so a study file and a train config
accept and refuse the same values with the same words."""

from __future__ import annotations

from typing import Any, Literal

from titan_mem.config_fields import coerce
from titan_mem.errors import ConfigError
from titan_mem.study.keys import StudyError


def typed(where: str, key: str, tp: Any, value: Any) -> Any:
    """`value` as type `tp` (`int`, `list[str]`, a `Literal[...]`), or one StudyError line naming `key`."""
    try:
        return coerce(key, tp, value, from_cli=False)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None


def str_list(where: str, key: str, value: Any) -> list[str]:
    return typed(where, key, list[str], value)


def int_list(where: str, key: str, value: Any) -> list[int]:
    return typed(where, key, list[int], value)


def positive(where: str, key: str, value: Any, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise StudyError(f"{where}: {key}: expected a {'non-negative' if allow_zero else 'positive'} integer")
    return value


def choice(where: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    return typed(where, key, Literal[allowed], value)
