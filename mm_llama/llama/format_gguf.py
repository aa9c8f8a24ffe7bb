"""GGUF files: the header and tensor table parsed here, the tensors' bytes memory-mapped and dequantised with the
`gguf` package row chunk by row chunk (q/k already in Meta's interleaved layout)."""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from .config import ModelArgs, RopeScaling
from .errors import CheckpointError, TensorStream
from .model import rope_inv_freq


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise CheckpointError(f"expected exactly one .gguf file in {path}, found {len(ggufs)}")
    return ggufs[0]


_GGUF_LAYER = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "ffn_norm": "ffn_norm",
}


def gguf_to_meta_key(name: str) -> str | None:
    if name == "token_embd.weight":
        return "tok_embeddings.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return "output.weight"
    if name == "rope_freqs.weight":
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
    raise KeyError(name)


GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _scaling_from_rope_freqs(factors: torch.Tensor, head_dim: int, theta: float, source: str) -> RopeScaling:
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover the parameters exactly."""
    base = rope_inv_freq(head_dim, theta)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for orig in (8192, 4096, 16384):
            cand = RopeScaling(factor=factor, original_max_position_embeddings=orig)
            want = base / rope_inv_freq(head_dim, theta, cand)
            if torch.allclose(want, factors.float(), rtol=1e-3, atol=1e-4):
                return cand
    raise CheckpointError(f"{source}: rope_freqs.weight does not match any llama3 RoPE scaling")


class _Tensor(NamedTuple):
    """One entry of a GGUF tensor table: its name, type, shape (GGUF order: fastest dimension first) and the bytes
    as a numpy view of the memory-mapped file (quantised types as rows of raw blocks, as `gguf.quants` takes them)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


_PLAIN_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def _blocks_in_torch(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor | None:
    """Q4_0, Q4_1 and Q8_0 rows of raw blocks dequantised with torch (the `gguf` package's numpy code takes seconds
    for a small tower); None for the other types. Block layouts as ggml writes them: an f16 scale (and for Q4_1 an f16
    minimum), then 32 values; 4-bit values hold element j in the low nibble of byte j and j+16 in its high nibble."""

    if qtype not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        return None
    rows = raw.shape[0]
    b = torch.from_numpy(np.array(raw, copy=True)).view(rows, -1, GGML_QUANT_SIZES[qtype][1])
    d = b[..., :2].contiguous().view(torch.float16).float()
    if qtype == GGMLQuantizationType.Q8_0:
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(rows, -1)
    qs = b[..., 4:] if qtype == GGMLQuantizationType.Q4_1 else b[..., 2:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()
    if qtype == GGMLQuantizationType.Q4_1:
        return (q * d + b[..., 2:4].contiguous().view(torch.float16).float()).reshape(rows, -1)
    return ((q - 8) * d).reshape(rows, -1)


def _dequantize_rows(t: _Tensor, dtype: torch.dtype, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Dequantise a GGUF tensor straight into a `dtype` tensor, a block of rows at a time (bounded temporaries)."""

    shape = tuple(reversed(t.shape))
    out = torch.empty(shape, dtype=dtype)
    data = t.data
    if len(shape) < 2 or data.ndim < 2:
        out.copy_(torch.tensor(dequantize(data, t.tensor_type)).reshape(shape))
        return out
    flat_out = out.view(-1, shape[-1])
    flat_data = data.reshape(flat_out.shape[0], -1)
    for r in range(0, flat_out.shape[0], rows_per_chunk):
        rows = _blocks_in_torch(flat_data[r : r + rows_per_chunk], t.tensor_type)
        if rows is None:
            chunk = dequantize(flat_data[r : r + rows_per_chunk], t.tensor_type)
            if not chunk.flags.writeable:  # F32 comes back as a view of the read-only memory map
                chunk = chunk.copy()
            rows = torch.from_numpy(chunk)
        flat_out[r : r + rows_per_chunk].copy_(rows.reshape(-1, shape[-1]))
    return out


def _read_gguf(path: Path) -> tuple[dict, dict[str, _Tensor]]:
    """The metadata and the tensor table of a GGUF file; the tensors' bytes stay in the memory map until read."""

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)  # the arrays cut from it keep the map open
    buf = memoryview(mapped)
    try:
        meta, pos = _parse_metadata(buf, path)
        (n_tensors,) = struct.unpack_from("<Q", buf, 8)
        table = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            table.append((name, dims, kind, offset))
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF header is damaged ({type(e).__name__}: {e})") from None
    finally:
        buf.release()
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors: dict[str, _Tensor] = {}
    for name, dims, kind, offset in table:
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice in the GGUF tensor table")
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown GGML type {kind}") from None
        n = math.prod(dims)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n * type_size // block
        lo = start + offset
        if lo + n_bytes > data.size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {lo + n_bytes}, past the end of the file ({data.size} bytes); "
                "the file is cut short"
            )
        np_shape = tuple(reversed(dims))
        raw = data[lo : lo + n_bytes]
        if qtype in _PLAIN_TYPES:
            view = raw.view(_PLAIN_TYPES[qtype]).reshape(np_shape)
        else:
            view = raw.reshape(quant_shape_to_byte_shape(np_shape, qtype))
        tensors[name] = _Tensor(name, qtype, tuple(int(d) for d in dims), view)
    return meta, tensors


def _gguf_stream(path: Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, TensorStream]:
    # long: one pass over the GGUF tensor table, each tensor type handled where it is read
    try:
        meta, tensors = _read_gguf(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not 'llama'")

    def need(key: str) -> Any:
        v = meta.get(key)
        if v is None:
            raise CheckpointError(f"{path}: missing GGUF metadata key {key!r}")
        return v

    dim = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    head_dim = int(meta.get("llama.rope.dimension_count", dim // n_heads))
    scaling = None
    scale_type = meta.get("llama.rope.scaling.type")
    if scale_type not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported RoPE scaling type {scale_type!r}")
    if "rope_freqs.weight" in tensors:
        rft = tensors["rope_freqs.weight"]
        rf = torch.tensor(dequantize(rft.data, rft.tensor_type))
        scaling = _scaling_from_rope_freqs(rf.reshape(-1), head_dim, theta, str(path))
    args = ModelArgs(
        dim=dim,
        n_layers=int(need("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        ffn_dim=int(need("llama.feed_forward_length")),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors,
        head_dim=head_dim,
        max_seq_len=int(meta.get("llama.context_length", 8192)),
    )

    def stream() -> TensorStream:
        for name, t in tensors.items():
            try:
                key = gguf_to_meta_key(name)
            except KeyError:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for a Llama tower") from None
            if key is None:
                continue
            qname = t.tensor_type.name
            if qname not in GGUF_SUPPORTED:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unsupported quantisation {qname} "
                    f"(supported: {', '.join(GGUF_SUPPORTED)})"
                )
            yield key, _dequantize_rows(t, dtype or torch.float32)

    return args, stream()


# --- the header, parsed directly (gguf.GGUFReader builds numpy views of every field, which takes seconds for a
# 49k-token vocabulary) --------------------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _string(buf: memoryview, p: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, p)
    if p + 8 + n > len(buf):
        raise ValueError(f"a string at byte {p} runs past the end of the file")
    return str(buf[p + 8 : p + 8 + n], "utf-8", errors="replace"), p + 8 + n


def _value(buf: memoryview, kind: int, p: int) -> tuple[Any, int]:
    if kind == 8:
        return _string(buf, p)
    if kind == 9:
        sub, count = struct.unpack_from("<IQ", buf, p)
        p += 12
        if sub in _SCALARS:
            fmt = _SCALARS[sub]
            size = struct.calcsize(fmt)
            if p + size * count > len(buf):
                raise ValueError(f"an array at byte {p} runs past the end of the file")
            vals = [v[0] for v in struct.iter_unpack(fmt, buf[p : p + size * count])]
            return vals, p + size * count
        out = []
        for _ in range(count):
            v, p = _value(buf, sub, p)
            out.append(v)
        return out, p
    fmt = _SCALARS[kind]
    return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)


def _parse_metadata(buf: memoryview, path: Path) -> tuple[dict, int]:
    """The key/value metadata and the byte where the tensor table starts."""

    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version < 2:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or later)")
    _, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    meta = {}
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _value(buf, kind, pos + 4)
    return meta, pos


def read_gguf_metadata(path: str | Path) -> dict:
    """The GGUF key/value metadata as Python values (strings, numbers, lists), without the tensors."""

    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            buf = memoryview(m)
            try:
                return _parse_metadata(buf, path)[0]
            finally:
                buf.release()
    except (struct.error, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is damaged ({type(e).__name__}: {e})") from None
