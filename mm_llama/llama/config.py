"""Llama 3 tower hyper-parameters and named presets.

`ModelArgs` mirrors Meta's `params.json` vocabulary (dim, n_layers, n_heads, ...) with the FFN width
stored explicitly (`ffn_dim`), so HF and GGUF configs map onto it without re-deriving Meta's rounding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypedDict


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" RoPE frequency scaling (llama-models `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads; always an int once constructed (__post_init__)
    max_seq_len: int = 8192

    def __post_init__(self) -> None:
        head_dim = self.head_dim
        if head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            head_dim = self.dim // self.n_heads
            object.__setattr__(self, "head_dim", head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")

    def replace(self, **kw: Any) -> ModelArgs:
        """A copy with fields changed; head_dim is re-derived when dim/n_heads change and it is not given."""
        if ("dim" in kw or "n_heads" in kw) and "head_dim" not in kw:
            kw["head_dim"] = None
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, hd = self.dim, head_dim_of(self)
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        ffn = 3 * d * self.ffn_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        return self.n_layers * per_layer + d + emb * (1 if self.tie_embeddings else 2)


def head_dim_of(args: ModelArgs) -> int:
    """`args.head_dim` as the int it always is once constructed (`__post_init__` resolves None)."""
    assert args.head_dim is not None
    return args.head_dim


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN width as Meta computes it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class _Llama3Shared(TypedDict):
    vocab_size: int
    norm_eps: float
    rope_theta: float


_L3 = _Llama3Shared(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
_S8 = RopeScaling(factor=8.0)
_S32 = RopeScaling(factor=32.0)

PRESETS: dict[str, ModelArgs] = {
    "llama3_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **_L3),
    "llama3_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_L3),
    "llama3_1_8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, rope_scaling=_S8, max_seq_len=131072, **_L3
    ),
    "llama3_1_70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, rope_scaling=_S8, max_seq_len=131072, **_L3
    ),
    "llama3_1_405b": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_dim=53248,
        rope_scaling=_S8,
        max_seq_len=131072,
        **_L3,
    ),
    "llama3_2_1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_scaling=_S32,
        tie_embeddings=True,
        max_seq_len=131072,
        **_L3,
    ),
    "llama3_2_3b": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_scaling=_S32,
        tie_embeddings=True,
        max_seq_len=131072,
        **_L3,
    ),
    "smollm2_135m": ModelArgs(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        vocab_size=49152,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
    # Llama 3 8B's layout scaled down (8 layers, GQA 8/2, FFN 3.5 x width) for checks of the memory plan on a CPU
    "mini": ModelArgs(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=1792,
        vocab_size=128256,
        rope_theta=500000.0,
        max_seq_len=2048,
    ),
    "debug": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, rope_theta=10000.0, max_seq_len=512
    ),
}


def get_preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown tower preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
