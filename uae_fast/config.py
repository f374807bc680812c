"""Config plumbing shared by every stage: nested dataclasses ⇄ dicts, YAML files and dotted `key=value` overrides.

Dataclasses are the single source of truth (defaults, help text, validation in `__post_init__`); this module only
moves values in and out of them, and turns every mistake (an unknown key, a value of the wrong type, a malformed
override) into a :class:`ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "load_yaml", "apply_overrides", "parse_override", "check_all"]


def from_dict(cls, data: Mapping | None, *, prefix: str = ""):
    """Build dataclass `cls` from a nested mapping; nested dataclass fields take nested mappings.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones), a value of the wrong type, or whatever the
            dataclass's own validation refuses.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}" if prefix and not str(exc).startswith(prefix) else str(exc)) from None


def to_dict(obj) -> dict:
    """Plain nested dict of a config dataclass (YAML/JSON-serialisable)."""
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` → (["a", "b"], value), the value parsed as YAML (so 3 is an int, true a bool, [1, 2] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} must look like key=value or section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unquoted string YAML cannot parse (e.g. 'a: b') is taken verbatim
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of nested `data` with each `dotted.key=value` applied (later ones win)."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _convert(hint, value, key: str):
    """Check `value` against the type `hint` (coercing int → float and nested mappings → dataclasses)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, value_type = typing.get_args(hint) or (None, typing.Any)
        return {k: _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(hint) or (typing.Any,)
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string; nobody means a string here
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def check_all(checks: Sequence[tuple[bool, str]]) -> None:
    """Raise a ConfigError with the message of the first (ok, message) check that failed."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
