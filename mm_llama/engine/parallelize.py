"""Placing a model for training, from outside it (the model files hold no distributed code): the tower's weight
dtype, activation checkpointing, FSDP2 sharding of the frozen tower (and optionally the adapters' large blocks),
and the optimizer's parameter groups.

A trainable model here is any module with `.tower` (a `Transformer`: `layers`, `tok_embeddings`, `output`), a
`shard_units()` method (the large repeated blocks of its trainable parts) and an `encoder_parameters()` method (the
parameters of media encoders, which may train at a fraction of the rate): `mm_llama.adapters.ComposedModel`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dist import DistInfo
from .shard import device_mesh, is_sharded, resident_bytes, shard_frozen


def weight_dtype(name: str, device) -> torch.dtype:
    """The frozen tower's weight dtype for a config's `dtype` on `device` (a torch.device or its type name): auto
    is bfloat16 on CUDA and float32 elsewhere. Training and evaluation both use it, so an adapter is evaluated on
    the tower it was trained with."""
    kind = device if isinstance(device, str) else device.type
    if name == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    return getattr(torch, name)


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters as AdamW groups: FSDP2-sharded ones (DTensors) apart from plain ones (the fused /
    foreach kernels take one kind at a time), and media encoders' weights at `encoder_lr_scale` x the rate (LambdaLR
    scales each group's own rate, so the ratio holds through warm-up and decay)."""
    encoders = {id(p) for p in model.encoder_parameters()} if encoder_lr_scale != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((is_sharded(p), id(p) in encoders), []).append(p)
    return [{"params": ps, "lr": lr * (encoder_lr_scale if enc else 1.0)} for (_, enc), ps in sorted(groups.items())]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute in backward, instead of storing their activations, each frozen tower layer and each adapter block
    (`model.shard_units()`); each keeps only its inputs."""
    for block in [*model.tower.layers, *model.shard_units()]:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def shard_model(model: nn.Module, info: DistInfo, mesh_layout: str, adapters: bool = False, compute_dtype=None):
    """`parallel.tower=fsdp`: the frozen tower's blocks, embeddings and output projection become FSDP2 units on the
    device (the final norm in the root unit); with `adapters` (`parallel.adapters=fsdp`) the model's `shard_units`
    too. Every other adapter weight stays a replicated tensor for our engine. Returns the sharded adapter units."""
    tower = model.tower
    tower_params = set(tower.parameters())
    units = model.shard_units() if adapters else []
    leave = {p for p in model.parameters() if p not in tower_params}
    tower_modules = set(tower.modules())
    for mod in model.modules():  # the adapters to the device; the tower moves there shard by shard
        if mod not in tower_modules:
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is not None:
                    t.data = t.data.to(info.device)
    mesh = device_mesh(info.device, info.world_size, info.local_world_size, mesh_layout)
    ends = [[tower.tok_embeddings, tower.output]] if tower.args.tie_embeddings else [tower.tok_embeddings, tower.output]
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


def place(model: nn.Module, info: DistInfo, parallel, *, activation_checkpointing: bool, compute_dtype=None) -> list:
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
