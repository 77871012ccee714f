"""Type checks of study-file values: each failure is one line naming the file and key."""

from __future__ import annotations

from typing import Any

from titan_mem.study.keys import StudyError


def str_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: {key}: expected a list of strings, got {value!r}")
    return list(value)


def int_list(where: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise StudyError(f"{where}: {key}: expected a list of integers, got {value!r}")
    return list(value)


def positive(where: str, key: str, value: Any, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise StudyError(f"{where}: {key}: expected a {'non-negative' if allow_zero else 'positive'} integer")
    return value


def choice(where: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        known = ", ".join(repr(a) for a in allowed)
        raise StudyError(f"{where}: {key}: expected one of {known}; got {value!r}")
    return value
