"""What every checkpoint format shares: the error type and the stream of (Meta key, tensor) pairs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message names the file and key."""


TensorStream = Iterator[tuple[str, torch.Tensor]]


_REQUIRED = object()
_D = TypeVar("_D")


@overload
def positive_int(cfg: Mapping[str, Any], key: str, source: str) -> int: ...
@overload
def positive_int(cfg: Mapping[str, Any], key: str, source: str, default: _D) -> int | _D: ...
def positive_int(cfg: Mapping[str, Any], key: str, source: str, default: object = _REQUIRED) -> object:
    """cfg[key] as a positive integer, or a CheckpointError naming the file and key (a config written by hand
    with `"hidden_size": "64"` or `0` must not end in a TypeError / ZeroDivisionError deep inside the loader)."""
    if key not in cfg or cfg[key] is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive integer, not {v!r}")
    return v


def check_heads(dim: int, n_heads: int, n_kv_heads: int, head_dim: int | None, source: str) -> None:
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{source}: {n_heads} attention heads are not a multiple of {n_kv_heads} key/value heads")
    if head_dim is None and dim % n_heads:
        raise CheckpointError(f"{source}: width {dim} is not divisible by {n_heads} heads (and no head_dim is given)")
    if (head_dim or dim // n_heads) % 2:
        raise CheckpointError(f"{source}: head dimension {head_dim or dim // n_heads} is odd (RoPE needs pairs)")


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON config as a dict, or a CheckpointError naming the file."""

    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj
