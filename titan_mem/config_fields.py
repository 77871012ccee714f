"""How a config key is declared and checked, for every section (`config/`, `data/config.py`): a dataclass
field with a default and a help line (`help_field`), a type that says what the key accepts (`int`,
`list[str]`, `str | None`, a `Literal[...]` of choices), and one generic check generated from that type.

Why here, one layer above `errors`: the sections live with the packages that read them (lingua's rule), so
`data/` declares its own; all of them share this one definition of what a key may hold."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import field
from typing import Any, Literal

from titan_mem.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def help_field(default: Any, text: str, factory: Any = None) -> Any:
    """A dataclass field with its `--help` line (every config key has a default and a help text)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def choices(tp: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` alias allows (e.g. `RANKINGS = choices(Ranking)`)."""
    return typing.get_args(tp)


def type_name(tp: Any) -> str:
    """How `--help` names a key's type: `a | b | c` for a Literal, `list[int]`, `str | None`."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def section_types(section_cls: type) -> dict[str, Any]:
    """{key: its declared type} of a section dataclass, annotations resolved."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def refuse_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Refuse a value outside `allowed`, naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}; got {value!r}")


def check_choices(section: Any, name: str) -> None:
    """Every `Literal`-typed key of a section (and each item of a `list[Literal]`) holds an allowed value,
    whoever set it (TOML, `--section.key=value`, or code)."""
    for key, tp in section_types(type(section)).items():
        value = getattr(section, key)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and value is not None:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is Literal:
            refuse_choice(f"{name}.{key}", value, typing.get_args(tp))
        elif typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
            for item in value:
                refuse_choice(f"{name}.{key}", item, typing.get_args(typing.get_args(tp)[0]))


def coerce(key: str, tp: Any, value: Any, from_cli: bool) -> Any:
    """`value` (from TOML, or a command-line string when `from_cli`) as type `tp`, or a ConfigError naming
    `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(key, non_none[0], value, from_cli)
    if origin is Literal:
        kind = type(args[0])
        value = coerce(key, kind, value, from_cli)
        refuse_choice(key, value, args)
        return value
    if origin is list:
        (elem,) = args
        if from_cli and isinstance(value, str) and value.strip().startswith("["):  # a TOML array
            try:
                value = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{key}: not a TOML array ({e}); got {value!r}") from None
        elif from_cli and isinstance(value, str):  # a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {type_name(elem)}; got {value!r}")
        return [coerce(key, elem, v, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")
