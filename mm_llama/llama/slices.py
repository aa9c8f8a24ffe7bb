"""Rows of a tower's weights read straight from its files, for towers loaded shard by shard (FSDP2 shards every
weight on dim 0, so a rank needs rows [start, stop) of each): `TowerRows(path).rows(key, start, stop)` returns
those rows in the Meta layout and dtype of the file, reading only them where the format allows:

- Hugging Face safetensors: `get_slice` reads the rows from the file; q/k projections are stored in HF's rotary
  order, so the rows of whole heads around the range are read and reordered;
- Meta consolidated .pth: the files are memory-mapped, and a slice of each model-parallel part (concatenated on its
  split dim) touches only those pages.

GGUF files are not read this way (quantised blocks span rows): `TowerRows` refuses them and the tower loads whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import detect_format, read_checkpoint
from .errors import CheckpointError
from .format_hf import hf_to_meta_key
from .format_meta import _mp_dim
from .model import Transformer


def _hf_q_rows(start: int, stop: int, out_dim: int, n_heads: int) -> torch.Tensor:
    """The HF rows holding Meta-layout rows [start, stop) of a q/k projection (HF keeps each head's two rotary
    halves apart; Meta interleaves them: Meta row h*hd + 2i + s is HF row h*hd + s*hd/2 + i)."""
    hd = out_dim // n_heads
    j = torch.arange(start, stop)
    h, r = j // hd, j % hd
    return h * hd + (r % 2) * (hd // 2) + r // 2


class TowerRows:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = detect_format(self.path)
        self.args, _, _ = read_checkpoint(self.path)
        self._handles: dict[str, Any] = {}  # safetensors' handles (untyped)
        if self.format == "hf":
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                files = {k: self.path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
            else:
                files = {}
                for f in sorted(self.path.glob("*.safetensors")):
                    with safe_open(str(f), framework="pt") as sf:
                        files |= dict.fromkeys(sf.keys(), f)
            self.where = {key: (f, k) for k, f in files.items() if (key := hf_to_meta_key(k))}
        elif self.format == "meta":
            shards = sorted(self.path.glob("consolidated.*.pth"))
            self.parts = [torch.load(s, map_location="cpu", weights_only=True, mmap=True) for s in shards]
        else:
            raise NotImplementedError(f"{self.path}: a {self.format} tower is read whole, not row by row")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the weight `key` (Meta name), as stored (dtype of the file)."""
        try:
            if self.format == "hf":
                return self._hf_rows(key, start, stop)
            return self._meta_rows(key, start, stop)
        except (KeyError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: {key} rows {start}:{stop} cannot be read ({e})") from None

    def _hf_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        f, hf_key = self.where[key]
        handle = self._handles.get(str(f))
        if handle is None:
            handle = self._handles[str(f)] = safe_open(str(f), framework="pt").__enter__()
        sl = handle.get_slice(hf_key)
        heads = {"attention.wq.weight": self.args.n_heads, "attention.wk.weight": self.args.n_kv_heads}
        n = next((h for suffix, h in heads.items() if key.endswith(suffix)), None)
        if n is None:
            return sl[start:stop]
        idx = _hf_q_rows(start, stop, sl.get_shape()[0], n)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return sl[lo:hi][idx - lo]

    def _meta_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        parts = [sd[key] for sd in self.parts]
        dim = _mp_dim(key) if len(parts) > 1 else None
        if dim is None:
            return parts[0][start:stop].clone()
        if dim == 1:
            return torch.cat([p[start:stop] for p in parts], dim=1)
        out, base = [], 0
        for p in parts:  # rows split across the model-parallel parts: the overlapping ones
            a, b = max(start, base), min(stop, base + p.shape[0])
            if a < b:
                out.append(p[a - base : b - base])
            base += p.shape[0]
        return torch.cat(out).clone()

    def close(self) -> None:
        """Release the files (and the pages of them that were mapped in)."""
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()
        if self.format == "meta":
            self.parts = []


def tower_skeleton(rows: TowerRows, dtype: torch.dtype) -> Transformer:
    """The tower on the meta device except its embeddings, read whole in `dtype` (adapter parts initialise their
    token rows from them; the largest tensor any rank holds whole): the rest is filled by `fill_sharded` once
    FSDP2 has sharded it."""
    with torch.device("meta"):
        tower = Transformer(rows.args).to(dtype)
    emb = rows.rows("tok_embeddings.weight", 0, rows.args.vocab_size).to(dtype)
    tower.tok_embeddings.weight = torch.nn.Parameter(emb, requires_grad=False)
    tower.tie_weights()
    return tower.requires_grad_(False).eval()


@torch.no_grad()
def fill_sharded(tower: Transformer, rows: TowerRows) -> int:
    """Give every still-empty (meta) weight of a tower sharded by FSDP2 its storage and this rank's rows, read from
    the files; returns the bytes read. A weight FSDP2 left whole (one process) is read whole."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - heavy (over 1 s), sharded runs only
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415 - as above

    for module in tower.modules():
        metas = [p for p in module.parameters(recurse=False) if p.device.type == "meta"]
        if metas:
            mesh = getattr(metas[0], "device_mesh", None)
            kind = mesh.device_type if mesh is not None else "cpu"
            dev = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
            module.to_empty(device=dev, recurse=False)
    read = 0
    for name, p in tower.named_parameters():
        if name == "tok_embeddings.weight" or (tower.args.tie_embeddings and name == "output.weight"):
            continue
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
        else:
            shape, offset, local = tuple(p.shape), (0,) * p.dim(), p
        if shape[0] == 0:
            continue
        if tuple(shape[1:]) != tuple(p.shape[1:]) or any(offset[1:]):
            raise NotImplementedError(f"{name}: sharded on a dim other than 0 ({getattr(p, 'placements', None)})")
        t = rows.rows(name, offset[0], offset[0] + shape[0])
        if tuple(t.shape) != tuple(local.shape):
            raise CheckpointError(
                f"{rows.path}: {name} rows have shape {tuple(t.shape)}, the shard {tuple(local.shape)}"
            )
        local.copy_(t)
        read += t.numel() * t.element_size()
    tower.reset_buffers()
    rows.close()
    return read
