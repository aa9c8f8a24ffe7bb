"""GGUF files: metadata and tensors read with the `gguf` package, quantised tensors dequantised row chunk by
row chunk (q/k already in Meta's interleaved layout)."""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf.quants import dequantize

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


def _gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


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


def _dequantize_rows(t: gguf.ReaderTensor, dtype: torch.dtype, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Dequantise a GGUF tensor straight into a `dtype` tensor, a block of rows at a time (bounded temporaries)."""

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    out = torch.empty(shape, dtype=dtype)
    data = t.data
    if len(shape) < 2 or data.ndim < 2:
        out.copy_(torch.tensor(dequantize(data, t.tensor_type)).reshape(shape))
        return out
    flat_out = out.view(-1, shape[-1])
    flat_data = data.reshape(flat_out.shape[0], -1)
    for r in range(0, flat_out.shape[0], rows_per_chunk):
        chunk = dequantize(flat_data[r : r + rows_per_chunk], t.tensor_type)
        if not chunk.flags.writeable:  # F32 comes back as a view of the read-only memory map
            chunk = chunk.copy()
        flat_out[r : r + rows_per_chunk].copy_(torch.from_numpy(chunk.reshape(-1, shape[-1])))
    return out


def _gguf_stream(path: Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, TensorStream]:
    # long: one pass over the GGUF tensor table, each tensor type handled where it is read
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not 'llama'")

    def need(key: str) -> Any:
        v = _gguf_field(reader, key)
        if v is None:
            raise CheckpointError(f"{path}: missing GGUF metadata key {key!r}")
        return v

    dim = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = _gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    theta = float(_gguf_field(reader, "llama.rope.freq_base", 10000.0))
    head_dim = int(_gguf_field(reader, "llama.rope.dimension_count", dim // n_heads))
    scaling = None
    scale_type = _gguf_field(reader, "llama.rope.scaling.type")
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
        n_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        ffn_dim=int(need("llama.feed_forward_length")),
        norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors,
        head_dim=head_dim,
        max_seq_len=int(_gguf_field(reader, "llama.context_length", 8192)),
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


# --- metadata only: the key/value header, parsed directly (GGUFReader builds numpy views of every field, which
# takes seconds for a 49k-token vocabulary; the tokenizer needs only these values) -------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: str | Path) -> dict:
    """The GGUF key/value metadata as Python values (strings, numbers, lists), without the tensors."""

    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            buf = memoryview(m)
            try:
                if bytes(buf[:4]) != b"GGUF":
                    raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
                version = struct.unpack_from("<I", buf, 4)[0]
                if version < 2:
                    raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or later)")
                _, n_kv = struct.unpack_from("<QQ", buf, 8)
                pos = 24

                def string(p: int) -> tuple[str, int]:
                    (n,) = struct.unpack_from("<Q", buf, p)
                    return str(buf[p + 8 : p + 8 + n], "utf-8", errors="replace"), p + 8 + n

                def value(kind: int, p: int) -> tuple[Any, int]:
                    if kind == 8:
                        return string(p)
                    if kind == 9:
                        sub, count = struct.unpack_from("<IQ", buf, p)
                        p += 12
                        if sub in _SCALARS:
                            fmt = _SCALARS[sub]
                            size = struct.calcsize(fmt)
                            vals = [v[0] for v in struct.iter_unpack(fmt, buf[p : p + size * count])]
                            return vals, p + size * count
                        out = []
                        for _ in range(count):
                            v, p = value(sub, p)
                            out.append(v)
                        return out, p
                    fmt = _SCALARS[kind]
                    return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)

                meta = {}
                for _ in range(n_kv):
                    key, pos = string(pos)
                    (kind,) = struct.unpack_from("<I", buf, pos)
                    meta[key], pos = value(kind, pos + 4)
                return meta
            finally:
                buf.release()
    except (struct.error, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is damaged ({type(e).__name__}: {e})") from None
