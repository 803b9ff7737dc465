"""Settings from a TOML/JSON file and `--set key=value` overrides, applied onto dataclass configs.

Each key belongs to exactly one of the configs given (model, optimizer, training, ...); an unknown key
or a value of the wrong type is a ConfigError that names the key and what it expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import reprlib
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError


def _field_types(config: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(config))
    return {f.name: hints[f.name] for f in dataclasses.fields(config)}


def parse_value(key: str, text: str, annotation: Any) -> Any:
    """Convert `text` to the field's type: int, float, bool, str, or an optional one ('none' for None)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    wanted = next(t for t in options if t is not type(None))
    try:
        if wanted is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if wanted is int and "." not in text and "e" not in text.lower():
            return int(text.replace("_", ""))
        if wanted is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if wanted is float and not math.isfinite(value := float(text)):
            raise ConfigError(f"--set {key}={_shown(text)}: expected a finite float (nan or inf gives only nan)")
        if wanted is float:
            return value
        if wanted is str and not text.isprintable():
            raise ValueError  # a line end or control character in a name, path or choice
        return wanted(text)
    except ValueError:
        raise ConfigError(f"--set {key}={_shown(text)}: expected {_type_name(wanted)}") from None


def _typed(key: str, value: Any, annotation: Any) -> Any:
    """A value read from a config file (or given by a command) as the field's type, or a ConfigError."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    wanted = next(t for t in options if t is not type(None))
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None and type(None) in options:
        return None
    if wanted is bool and isinstance(value, bool):
        return value
    if wanted is str and isinstance(value, str) and value.isprintable():
        return value
    if wanted is int and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if wanted is float and number and -sys.float_info.max <= value <= sys.float_info.max:  # no nan, no inf
        return float(value)
    finite = " (a finite one)" if wanted is float and number else ""
    raise ConfigError(f"{key} = {reprlib.repr(value)}: expected {_type_name(wanted)}{finite}")


def _type_name(wanted: Any) -> str:
    return "text on one line" if wanted is str else getattr(wanted, "__name__", str(wanted))


def _shown(text: str) -> str:
    """`text` on one line: line ends and other unprintable characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def apply_settings(configs: list[Any], settings: dict[str, Any]) -> list[Any]:
    """New copies of `configs` with `settings` applied; string values are parsed by field type."""
    owners = {name: i for i, config in enumerate(configs) for name in _field_types(config)}
    changes: list[dict[str, Any]] = [{} for _ in configs]
    for key, value in settings.items():
        if key not in owners:
            close = difflib.get_close_matches(key, owners, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting '{_shown(key)}'{hint}")
        index = owners[key]
        annotation = _field_types(configs[index])[key]
        parse = parse_value if isinstance(value, str) else _typed
        changes[index][key] = parse(key, value, annotation)
    return [dataclasses.replace(config, **change) for config, change in zip(configs, changes, strict=True)]


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['n_layer=6', 'lr=3e-4'] -> {'n_layer': '6', 'lr': '3e-4'}."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair}: write it as key=value, e.g. --set n_layer=6")
        settings[key.strip()] = value.strip()
    return settings


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .toml or .json file (a flat table of key = value)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"{path}: config files are .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        settings = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 at byte {e.start:,}; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer past 4,300 digits; nesting past the stack
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise ConfigError(f"{path}: cannot read it ({why})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: should hold one object of settings (key: value), not a {type(settings).__name__}")
    return settings
