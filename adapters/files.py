"""Adapter files: one part's weights (its state_dict, never the tower's) in a safetensors file with metadata.

The metadata (JSON under the "mm_llama" key) records the plug-in's `format`, what rebuilds the part's modules (the
plug-in's `part.meta`), its token id range, the tower shape and weight dtype it was trained on and the project
version. The tower itself always loads from the user's own checkpoint. Files of any kind load in any order onto one
tower (`load_composed`); each is checked against the tower and the registry before its weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mm_llama
from mm_llama.engine.shard import gather_full, is_sharded
from mm_llama.llama.checkpoint import CheckpointError
from mm_llama.llama.model import Transformer

from .composed import ComposedModel
from .registry import MODALITIES, get_modality, modality_for_format, token_rows

TOWER_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim")


def tower_shape(tower: Transformer) -> dict:
    return {k: getattr(tower.args, k) for k in TOWER_SHAPE}


FORMAT_REQUIRES = "0.1.0"  # adapter files' layout has not changed since 0.1.0: every release reads them


def save_state(state: dict, path: str | Path, meta: dict) -> None:
    """Write `state` with `meta` atomically (temp file + rename). Weights sharded with FSDP2 (`parallel.adapters=fsdp`)
    are gathered whole: then every rank calls this (a collective) and rank 0 writes."""
    path = Path(path)
    writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if any(is_sharded(v) for v in state.values()):
        state = gather_full(state, keep=writer)
    if not writer:
        return
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"mm_llama": json.dumps(meta)})
    tmp.replace(path)


def save_part(model: ComposedModel, kind: str, path: str | Path, sources: dict | None = None) -> None:
    """Write the `kind` part of `model` as an adapter file. `sources`: where the run's tower and tokenizer came from
    (`{"tower": path | asset:NAME | preset:..., "tokenizer": ...}`), so the file can be answered with alone."""
    spec = get_modality(kind)
    part = model.part(kind)
    meta = {
        "format": spec.format,
        "version": mm_llama.__version__,
        "requires": FORMAT_REQUIRES,  # the oldest mm_llama that reads this file (raise it when the format changes)
        "token_rows": {kind: list(model.token_rows[kind])},
        "tower": tower_shape(model.tower),
        "tower_dtype": str(model.tower.tok_embeddings.weight.dtype).removeprefix("torch."),
        **spec.part.meta(part),
        **({"sources": sources} if sources else {}),
    }
    save_state(part.state_dict(), path, meta)


def read_adapter_meta(path: str | Path) -> dict:
    """The mm_llama metadata of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint does not exist: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("mm_llama")
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if meta is None:
        raise CheckpointError(f"{path}: no mm_llama adapter metadata (was it written by mm_llama?)")
    meta = json.loads(meta)
    needs = meta.get("requires")
    if needs and version_tuple(needs) > version_tuple(mm_llama.__version__):
        raise CheckpointError(
            f"{path}: written by mm_llama {meta.get('version')} in a format that needs mm_llama >= {needs}; "
            f"this is {mm_llama.__version__}: upgrade (pip install -U mm-llama)"
        )
    return meta


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.2.0' -> (0, 2, 0) (pre-release and local suffixes ignored)."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split("+")[0].split(".")[:3])


def adapter_kind(path) -> str:
    """The modality of an adapter file, read from its metadata."""
    fmt = read_adapter_meta(path).get("format")
    spec = modality_for_format(fmt)
    if spec is None:
        known = ", ".join(m.format for m in MODALITIES.values())
        raise CheckpointError(f"{path}: unknown adapter format {fmt!r} (known: {known})")
    return spec.name


def trained_tower_dtype(paths) -> str:
    """The tower weight dtype the adapter files were trained with ("float32" for files that do not record it);
    a CheckpointError names the files when they disagree."""
    seen = {str(p): read_adapter_meta(p).get("tower_dtype") or "float32" for p in paths}
    if len(set(seen.values())) > 1:
        listed = ", ".join(f"{p}: {d}" for p, d in seen.items())
        raise CheckpointError(
            f"the adapters were trained on towers of different dtypes ({listed}); pick one with --dtype"
        )
    return next(iter(seen.values()), "float32")


def check_fits(meta: dict, kind: str, tower: Transformer, path) -> None:
    """The file's tower shape and token ids are this tower's and this registry's (files that predate a field are
    not checked on it)."""
    want = meta.get("tower", {})
    have = tower_shape(tower)
    diff = {k: (v, have[k]) for k, v in want.items() if k in have and v != have[k]}
    if diff:
        raise CheckpointError(f"{path}: adapter was trained on a different tower: {diff} (adapter, this tower)")
    rows = meta.get("token_rows", {}).get(kind)
    if rows is not None and tuple(rows[:2]) != token_rows()[kind]:
        raise CheckpointError(
            f"{path}: its {kind} token ids are {tuple(rows[:2])} (offset from the vocabulary, count); "
            f"this installation gives {kind} {token_rows()[kind]}"
        )


def load_state(part: nn.Module, path, *, strict: bool = True, may_lack: set[str] = frozenset()) -> None:
    """A part's weights from a file: the file must hold exactly the part's state_dict keys (`strict`; `may_lack`: keys
    the part may start without), or a subset."""
    state = load_file(str(path))
    expected = set(part.state_dict())
    missing, unexpected = sorted(expected - set(state) - set(may_lack)), sorted(set(state) - expected)
    if unexpected or (missing and strict):
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, v in state.items():
        want = part.state_dict()[k].shape
        if v.shape != want:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the part {tuple(want)}")
    part.load_state_dict(state, strict=False)


def load_part(tower: Transformer, path, parts: dict) -> tuple[str, nn.Module]:
    """(kind, part) of an adapter file onto `tower` (`parts`: those loaded already, e.g. the image part a video
    part reads), in fp32 on the tower's device."""
    kind = adapter_kind(path)
    meta = read_adapter_meta(path)
    check_fits(meta, kind, tower, path)
    try:
        part = get_modality(kind).part.from_meta(tower, meta, parts, str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its metadata does not describe a {kind} part ({type(e).__name__}: {e})"
        ) from None
    load_state(part, path)
    return kind, part.to(tower.tok_embeddings.weight.device).eval()


def load_composed(tower: Transformer, paths) -> ComposedModel:
    """Load adapter files of any kind (read from each file) onto `tower`: at most one per kind, a part's `requires`
    among them."""
    by_kind: dict[str, str] = {}
    for p in paths:
        kind = adapter_kind(p)
        if kind in by_kind:
            raise CheckpointError(f"two {kind} adapters given: {by_kind[kind]} and {p} (one per kind)")
        by_kind[kind] = str(p)
    parts: dict[str, nn.Module] = {}
    for kind, spec in MODALITIES.items():  # registry order: what a part requires loads first
        if kind not in by_kind:
            continue
        for need in spec.requires:
            if need not in by_kind:
                raise CheckpointError(
                    f"{by_kind[kind]}: a {kind} adapter runs on its {need} adapter: pass that one too"
                )
        parts[kind] = load_part(tower, by_kind[kind], parts)[1]
    return ComposedModel(tower, parts).eval()


def init_part_from_file(model: ComposedModel, kind: str, path) -> None:
    """A part's weights (trainable and frozen) from an adapter file of the same modality and options (training's
    `init_adapter=`)."""
    found = adapter_kind(path)
    if found != kind:
        raise CheckpointError(f"{path} is a {found} adapter, this run trains {kind}")
    check_fits(read_adapter_meta(path), kind, model.tower, path)
    part = model.part(kind)
    fresh = part.fresh_keys() if hasattr(part, "fresh_keys") else set()  # e.g. a new input mode's own weights
    load_state(part, path, may_lack=fresh)
