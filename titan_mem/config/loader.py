"""Reading a config: a TOML file, then `--section.key=value` overrides, then the dependent defaults and the
checks (`rules`); a run's resolved `config.json` reads back the same way. Unknown sections and keys, wrong
types and bad choices are one ConfigError line naming the key; `--help` is generated from the fields."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from titan_mem.config.rules import resolve_defaults, validate
from titan_mem.config.sections import Config
from titan_mem.config_fields import coerce, section_types, tomllib, type_name
from titan_mem.errors import ConfigError


def _set(cfg: Config, dotted: str, value: Any, from_cli: bool) -> None:
    if "." not in dotted:
        raise ConfigError(f"{dotted}: config keys look like section.key")
    section_name, key = dotted.split(".", 1)
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ConfigError(
            f"{dotted}: unknown section '{section_name}' (known: {', '.join(sorted(sections))})"
        )
    section = getattr(cfg, section_name)
    types_ = section_types(type(section))
    if key not in types_:
        raise ConfigError(f"{dotted}: unknown key '{key}' in [{section_name}]")
    setattr(section, key, coerce(dotted, types_[key], value, from_cli))


def _apply_toml(cfg: Config, data: dict[str, Any], path: str) -> None:
    for section_name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{section_name}' must be a [section]")
        for key, value in table.items():
            _set(cfg, f"{section_name}.{key}", value, from_cli=False)


def help_text() -> str:
    lines = ["usage: python -m titan_mem.train [CONFIG.toml] [--section.key=value ...]", ""]
    for sec in dataclasses.fields(Config):
        lines.append(f"[{sec.name}]")
        section_cls = sec.default_factory  # type: ignore[misc]
        types_ = section_types(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"  --{sec.name}.{f.name} ({type_name(types_[f.name])}, default {default!r}): "
                f"{f.metadata.get('help', '')}"
            )
        lines.append("")
    return "\n".join(lines)


def read_toml(path: Path, kind: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one ConfigError line naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def parse_args(argv: list[str]) -> Config:
    """Build a Config from `[CONFIG.toml] [--section.key=value | --section.key value]...`."""
    cfg = Config()
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        p = Path(path)
        data = read_toml(p)
        _apply_toml(cfg, data, path)
        cfg.job.config_file = str(p)
    apply_overrides(cfg, args)
    return cfg


def apply_overrides(cfg: Config, args: list[str]) -> None:
    """Apply `--section.key=value` / `--section.key value` / bare `--flag` arguments, fill the dependent
    defaults (`resolve_defaults`), then validate."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            key = arg[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                # A bare boolean flag means true.
                value = "true"
            else:
                value = args[i + 1]
                i += 1
        _set(cfg, key, value, from_cli=True)
        i += 1
    resolve_defaults(cfg)
    validate(cfg)


def load_run_config(path: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run wrote (`config.json`, see `dump`), with overrides: how evaluation and
    generation rebuild the model, tokenizer and synthetic world of a checkpoint's run."""
    if not path.is_file():
        raise ConfigError(f"{path}: run config not found (pass the run's config with --config)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections")
    cfg = Config()
    _apply_toml(cfg, data, str(path))
    apply_overrides(cfg, list(overrides or []))
    return cfg


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved config as JSON next to the checkpoints (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m titan_mem.config CONFIG [overrides]`: validate only (used by run_train.sh before launch)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
