"""Typed configs: YAML values -> nested dataclasses, `key.sub=value` overrides, unknown keys are errors.

Defaults live in the dataclasses; a YAML file lists only what differs. Values in overrides are parsed as YAML
scalars (`lr=3e-4`, `engine=ours`, `tower.path=null`, `steps=[1,2]`). Fields declared with `choice(...)` or
`bounded(...)` are checked when the config loads (a ConfigError names the key and what is allowed), so a bad value
stops a run before it writes anything.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")  # a config class


class ConfigError(ValueError):
    pass


def choice(default: T, *options: T) -> T:
    """A dataclass field whose value must be one of `options` (the default among them)."""
    assert default in options, (default, options)
    return dataclasses.field(default=default, metadata={"choices": tuple(options)})


def bounded(default: T, lo: float | None = None, hi: float | None = None) -> T:
    """A numeric dataclass field with lo <= value <= hi (None: open; a None value passes where the type allows)."""
    return dataclasses.field(default=default, metadata={"min": lo, "max": hi})


def auto_or_bounded(default: T, lo: float | None = None, hi: float | None = None) -> T:
    """A numeric field that also takes the string "auto" (the code picks the value), e.g. a bucket cap."""
    return dataclasses.field(default=default, metadata={"min": lo, "max": hi, "auto": True})


def _check(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    if isinstance(value, str) and meta.get("auto"):
        if value != "auto":
            raise ConfigError(f"{where}: {value!r} is not allowed; give a number or auto")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{where}: {value!r} is out of range; it must be {rng}")


def _build(cls: type[D], data: object, where: str) -> D:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a section
            kwargs[name] = _build(hint, value or {}, sub)
        else:
            kwargs[name] = _coerce(value, hint, sub)
            _check(kwargs[name], fields[name].metadata, sub)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if hint is type(None) or (
            origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args
        ):
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else typing.Any
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v if item is typing.Any else _coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if float in (hint, *args) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    d = data
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load_config(cls: type[D], path: str | Path | None = None, overrides: list[str] | None = None) -> D:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read ({e})") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value")
        key, raw = ov.split("=", 1)
        set_path(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return _build(cls, data, "")


def to_dict(cfg: DataclassInstance) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: DataclassInstance, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
