"""Settings from a TOML/JSON file and `--set key=value` overrides, applied onto dataclass configs.

Each key belongs to exactly one of the configs given (model, optimizer, training, ...); an unknown key
or a value of the wrong type is a ConfigError that names the key and what it expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
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
        return wanted(text)
    except ValueError:
        raise ConfigError(f"--set {key}={text}: expected {getattr(wanted, '__name__', wanted)}") from None


def apply_settings(configs: list[Any], settings: dict[str, Any]) -> list[Any]:
    """New copies of `configs` with `settings` applied; string values are parsed by field type."""
    owners = {name: i for i, config in enumerate(configs) for name in _field_types(config)}
    changes: list[dict[str, Any]] = [{} for _ in configs]
    for key, value in settings.items():
        if key not in owners:
            close = difflib.get_close_matches(key, owners, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting '{key}'{hint}")
        index = owners[key]
        annotation = _field_types(configs[index])[key]
        changes[index][key] = parse_value(key, value, annotation) if isinstance(value, str) else value
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
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    raise ConfigError(f"{path}: config files are .toml or .json")
