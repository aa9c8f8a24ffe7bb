"""Placing a model for training, from outside it (the model files hold no distributed code): the tower's weight
dtype, activation checkpointing, FSDP2 sharding of the frozen tower (and optionally the adapters' large blocks),
and the optimizer's parameter groups.

A trainable model here is any module with `.tower` (a `Transformer`: `layers`, `tok_embeddings`, `output`), a
`shard_units()` method (the large repeated blocks of its trainable parts) and an `encoder_parameters()` method (the
parameters of media encoders, which may train at a fraction of the rate): `mm_llama.adapters.ComposedModel`
(`Trainable` says it to the type checker).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm_llama.llama.model import Transformer

from .dist import DistInfo
from .shard import device_mesh, is_sharded, resident_bytes, shard_frozen

if TYPE_CHECKING:
    from .trainer import ParallelConfig


class Trainable(Protocol):
    """What placement and the optimizer's groups ask of a model besides being an `nn.Module`."""

    @property
    def tower(self) -> Transformer: ...

    def shard_units(self) -> list[nn.Module]: ...

    def encoder_parameters(self) -> list[nn.Parameter]: ...


def trainable(model: nn.Module) -> Trainable:
    """`model` seen as a `Trainable`, or a TypeError naming what it lacks."""
    missing = [name for name in ("tower", "shard_units", "encoder_parameters") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a trainable model: it has no {', '.join(missing)}")
    return cast(Trainable, model)


def weight_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The frozen tower's weight dtype for a config's `dtype` on `device` (a torch.device or its type name): auto
    is bfloat16 on CUDA and float32 elsewhere. Training and evaluation both use it, so an adapter is evaluated on
    the tower it was trained with."""
    kind = device if isinstance(device, str) else device.type
    if name == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    return getattr(torch, name)


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: FSDP2-sharded ones (DTensors) apart from plain ones (the fused /
    foreach kernels take one kind at a time), and media encoders' weights at `encoder_lr_scale` x the rate (LambdaLR
    scales each group's own rate, so the ratio holds through warm-up and decay)."""
    encoders = {id(p) for p in trainable(model).encoder_parameters()} if encoder_lr_scale != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((is_sharded(p), id(p) in encoders), []).append(p)
    return [{"params": ps, "lr": lr * (encoder_lr_scale if enc else 1.0)} for (_, enc), ps in sorted(groups.items())]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute in backward, instead of storing their activations, each frozen tower layer and each adapter block
    (`model.shard_units()`); each keeps only its inputs."""
    tm = trainable(model)
    for block in [*tm.tower.layers, *tm.shard_units()]:
        fwd = block.forward

        def recompute(*a: Any, _f: Any = fwd, **k: Any) -> Any:
            return checkpoint(_f, *a, use_reentrant=False, **k)

        block.forward = recompute


def shard_model(
    model: nn.Module,
    info: DistInfo,
    mesh_layout: str,
    adapters: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> list[nn.Module]:
    """`parallel.tower=fsdp`: the frozen tower's blocks, embeddings and output projection become FSDP2 units on the
    device (the final norm in the root unit); with `adapters` (`parallel.adapters=fsdp`) the model's `shard_units`
    too. Every other adapter weight stays a replicated tensor for our engine. Returns the sharded adapter units."""
    tm = trainable(model)
    tower = tm.tower
    tower_params = set(tower.parameters())
    units = tm.shard_units() if adapters else []
    leave = {p for p in model.parameters() if p not in tower_params}
    tower_modules = set(tower.modules())
    for mod in model.modules():  # the adapters to the device; the tower moves there shard by shard
        if mod not in tower_modules:
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is not None:
                    t.data = t.data.to(info.device)
    mesh = device_mesh(info.device, info.world_size, info.local_world_size, mesh_layout)
    ends: list[nn.Module | list[nn.Module]] = (
        [[tower.tok_embeddings, tower.output]] if tower.args.tie_embeddings else [tower.tok_embeddings, tower.output]
    )
    shard_frozen(model, [*tower.layers, *ends], mesh, leave=leave, trained_units=units, compute_dtype=compute_dtype)
    tower.reset_buffers()
    if info.is_main:
        res = resident_bytes(tower)
        print(
            f"parallel.tower=fsdp: tower weights {res.local / 1e6:.1f} MB of {res.full / 1e6:.1f} MB on this rank "
            f"({res.fraction:.3f}; mesh {mesh_layout} {tuple(mesh.shape)})",
            file=sys.stderr,
            flush=True,
        )
        if units:
            local = sum(resident_bytes(u).local for u in units)
            full = sum(resident_bytes(u).full for u in units)
            print(
                f"parallel.adapters=fsdp: {len(units)} adapter units, {local / 1e6:.1f} MB of {full / 1e6:.1f} MB "
                "on this rank",
                file=sys.stderr,
                flush=True,
            )
    return units


def place(
    model: nn.Module,
    info: DistInfo,
    parallel: ParallelConfig,
    *,
    activation_checkpointing: bool,
    compute_dtype: torch.dtype | None = None,
) -> list[nn.Module]:
    """The model on this rank as `parallel` (tower, mesh, adapters) says: sharded (several processes,
    tower=fsdp) or whole on the device. Returns the sharded adapter units (empty unless adapters=fsdp)."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if parallel.tower == "fsdp" and info.distributed:
        adapters = parallel.adapters == "fsdp"
        return shard_model(model, info, parallel.mesh, adapters=adapters, compute_dtype=compute_dtype)
    if parallel.tower == "fsdp" and info.is_main:
        print("parallel.tower=fsdp: one process, nothing to shard (the tower stays whole)", file=sys.stderr)
    model.to(info.device)
    return []
