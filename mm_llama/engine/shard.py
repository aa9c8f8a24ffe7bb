"""A frozen trunk sharded with torch's FSDP2 (`fully_shard`) beside our DDP engine for the trainable parts.

    mesh = device_mesh(info, "flat")                       # all ranks shard ("hybrid": shard within a machine,
                                                           #  replicate across machines: a 2-D mesh)
    shard_frozen(root, units, mesh, leave=adapter_params)   # units: blocks, embeddings, output
    DistributedDataParallel(root, ...)                     # the trainable parts: replicated, bucketed all-reduce

Each block becomes one FSDP2 unit: its weights live as 1/N shards (DTensors) and are all-gathered just before the
block runs, freed after it (`reshard_after_forward`), and gathered again in backward only if autograd runs through
the block, i.e. where something trainable sits below it (token rows, an earlier cross-attention block); nothing
is reduced for frozen weights. The embeddings and the output projection are units of their own (one unit when
tied); the root unit keeps the small leftovers (the final norm) gathered; every parameter in `leave` (the
adapters, trainable or frozen) stays an ordinary replicated tensor, so our engine buckets and all-reduces the
trainable ones exactly as without sharding. The model files contain no distributed code: this wraps them from
outside, and world size 1 runs the same code (a 1-rank mesh) so every test runs on CPU with gloo.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

# FSDP2, DTensor and distributed checkpointing are imported where they are used: together they cost every process
# most of a second at start-up (dynamo included), and only a sharded run needs them.
if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


@dataclass
class Resident:
    """Bytes of a module's parameters held by this rank (`local`: its shards and replicated tensors) and in the
    whole model (`full`)."""

    local: int
    full: int

    @property
    def fraction(self) -> float:
        return self.local / max(self.full, 1)


def device_mesh(device: torch.device, world_size: int, local_world_size: int, layout: str = "flat") -> DeviceMesh:
    """The FSDP2 mesh: `flat` = one dimension over all ranks; `hybrid` = (machines, ranks per machine): shards
    within a machine, replicas across machines (HSDP). A world that does not split into whole machines is an
    error naming the sizes."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415 - heavy; sharded runs only

    if layout == "flat" or local_world_size >= world_size:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    if layout != "hybrid":
        raise ValueError(f"parallel.mesh must be flat or hybrid, not {layout!r}")
    if world_size % local_world_size:
        raise ValueError(
            f"parallel.mesh=hybrid: {world_size} ranks do not split into machines of {local_world_size} ranks"
        )
    return init_device_mesh(
        device.type, (world_size // local_world_size, local_world_size), mesh_dim_names=("replicate", "shard")
    )


def shard_frozen(
    root: nn.Module,
    units: Iterable[nn.Module | list[nn.Module]],
    mesh: DeviceMesh,
    *,
    leave: set[nn.Parameter] | None = None,
    trained_units: Iterable[nn.Module] = (),
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Shard each of `units` (a module, or a list of modules sharing weights, e.g. a tied embedding and output
    projection: gathered before the first of them runs, freed after the last) as one FSDP2 unit, then the rest of
    `root`'s parameters except `leave` as the root unit (kept gathered from the root's forward to the end of its
    backward: only small leftovers belong there). Units are freed after their forward and gathered again in
    backward only when autograd runs through them. `units` must be frozen; `trained_units` (large trainable
    blocks: `parallel.adapters=fsdp`) are sharded the same way and FSDP2 reduce-scatters their gradients
    (averaged over ranks, as our engine averages the replicated rest). Every other trainable parameter must be in
    `leave`: it belongs to the DDP engine. `compute_dtype` (bf16 under autocast): the trained units are gathered in
    it and their gradients reduced in fp32 (FSDP2's mixed precision; their fp32 shards stay the optimizer's)."""

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415 - heavy; sharded runs only

    leave = set(leave or ())
    trained_units = list(trained_units)
    in_trained = {p for u in trained_units for p in u.parameters()}
    stray = [n for n, p in root.named_parameters() if p.requires_grad and p not in leave and p not in in_trained]
    if stray:
        raise ValueError(f"shard_frozen: trainable parameters would be sharded: {stray[:5]} (pass them in leave)")

    # without a compute dtype: FSDP2's default policy (no casts)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    for unit in trained_units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=mp or MixedPrecisionPolicy())
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, reshard_after_forward=False, ignored_params=leave - in_trained)


def is_sharded(t: object) -> TypeGuard[DTensor]:
    """A DTensor (an FSDP2 shard)? Without importing torch.distributed.tensor (over a second of start-up, dynamo
    included) when nothing was sharded: no DTensor can exist before that module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or state (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


def gather_full(named: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors of `named` on the CPU, one at a time (sharded ones gathered: every rank calls this); the ranks
    with `keep=False` return {} (only the writer holds the copy)."""
    out = {}
    for k, v in named.items():
        t = full_tensor(v.detach())
        if keep:
            out[k] = t.cpu()
        del t
    return out


@torch.no_grad()
def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded (this rank's shard of it, no communication) or not."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415 - heavy; sharded runs only

        full = distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(full)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a state saved with plain tensors: each sharded parameter's state tensors become
    DTensors laid out like the parameter (a whole tensor: this rank's part of it; a local shard: as it is)."""
    if not any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        return
    from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: PLC0415 - heavy; sharded runs only

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if not torch.is_tensor(v) or is_sharded(v) or v.dim() == 0:
                    continue
                if v.shape == p.shape:  # a whole state (saved by one process): this rank's part of it
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                elif v.shape == p.to_local().shape:
                    st[k] = DTensor.from_local(
                        v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer state of a model with FSDP2-sharded trainable blocks, written by every rank into `folder` with
    torch.distributed.checkpoint (keyed by parameter name, each shard with its place in the whole tensor), so any
    world size can load it (`load_sharded_optimizer`)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # noqa: PLC0415 - heavy; sharded runs only
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: PLC0415 - heavy; sharded runs only

    dcp_save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the positions its state_dict uses)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (not by position in its groups), so a run whose parameters
    are grouped differently (sharded apart from plain ones on another world size) can load it
    (`load_optimizer_by_name`). Its parameters must be plain tensors (sharded ones: `save_sharded_optimizer`)."""
    order = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {order[i]: st for i, st in sd["state"].items()}, "param_groups": groups}


def load_optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A state from `optimizer_state_by_name` into this run's optimizer, whatever its grouping (the groups'
    settings are this run's: the same config); sharded parameters take their part of each whole state tensor."""
    order = _param_names(model, optimizer)
    missing = [n for n in order if n not in saved["state"]]
    if missing and saved["state"]:
        raise ValueError(f"the saved optimizer state has no entry for {missing[:3]} (another model?)")
    current = optimizer.state_dict()
    state = {i: saved["state"][n] for i, n in enumerate(order) if n in saved["state"]}
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    reshard_optimizer_state(optimizer)


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer state saved by `save_sharded_optimizer` on any world size, read into this run's layout (each
    rank reads the parts of the saved shards that make up its own)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: PLC0415 - heavy; sharded runs only
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load  # noqa: PLC0415 - heavy; sharded runs only

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # this layout, to be filled in
    dcp_load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def resident_bytes(module: nn.Module) -> Resident:
    """Parameter bytes this rank holds for `module` vs the whole (sharded DTensors count their local shard)."""
    local = full = 0
    seen = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        full += p.numel() * p.element_size()
        local += (p.to_local() if is_sharded(p) else p).numel() * p.element_size()
    return Resident(local, full)
