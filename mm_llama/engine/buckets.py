"""Gradient bucket plan: which trainable parameters share one flat all-reduce buffer.

Same rule as torch's `dist._compute_bucket_assignment_by_size` (reducer.cpp): walk the tensors in the given
order, keep one open bucket per (dtype, device); add the tensor; once the bucket's byte size reaches the current
cap it closes (the crossing tensor stays in) and that (dtype, device) moves to the next cap in the list
(1 MiB first, then 25 MiB for the rest). Open buckets are appended at the end. Without an explicit order the
buckets are sorted by their smallest tensor index; with one (the gradient-ready order) they keep their order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .shard import is_sharded

AUTO_BUCKETS = 32  # "auto": about this many buckets over the trainable gradients ...
AUTO_MIN_BYTES = 1 << 20  # ... but none below 1 MiB (per-call latency) ...
AUTO_MAX_BYTES = 25 << 20  # ... nor above torch's 25 MiB default (large adapters keep torch's plan)
AUTO_CHEAP_COMM_S = 0.1  # a link that all-reduces every trainable gradient faster than this keeps torch's plan


def trainable_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of the largest (dtype, device) group of `params` (each group has its own buckets)."""
    per_key: dict[tuple, int] = {}
    for p in params:
        key = (p.dtype, p.device)
        per_key[key] = per_key.get(key, 0) + p.numel() * p.element_size()
    return max(per_key.values(), default=0)


def auto_bucket_caps(params: Sequence[torch.Tensor], comm_s: float | None = None) -> tuple[int, int]:
    """(bucket cap, first bucket cap) in bytes for `bucket_cap_mb="auto"`.

    Communication hides behind backward only when a bucket is launched while backward still has work to do. A
    fixed 25 MiB cap is tuned for full-model training (gigabytes of gradients); adapter training has tens of MiB,
    which a 25 MiB cap packs into one or two buckets launched at the very end of backward (nothing to hide behind).
    Auto splits the trainable gradients of each (dtype, device) into about AUTO_BUCKETS buckets, so each adapter
    block's all-reduce starts while the frozen layers below it run backward; the floor keeps per-call latency small
    and the ceiling keeps torch's plan once the gradients are large. `comm_s`, the measured time to all-reduce all
    of them (the engine probes the link at start-up), below AUTO_CHEAP_COMM_S means there is little to hide and
    more calls only cost: torch's plan (25 MiB, first 1 MiB) then."""
    if comm_s is not None and comm_s < AUTO_CHEAP_COMM_S:
        return AUTO_MAX_BYTES, AUTO_MIN_BYTES
    cap = min(max(trainable_bytes(params) // AUTO_BUCKETS, AUTO_MIN_BYTES), AUTO_MAX_BYTES)
    return cap, min(cap, AUTO_MIN_BYTES)


@dataclass
class BucketSpec:
    indices: list[int] = field(default_factory=list)  # parameter indices, in bucket layout order
    size_bytes: int = 0
    size_limit: int = 0


def compute_bucket_assignment_by_size(
    tensors: Sequence[torch.Tensor],
    bucket_size_limits: Sequence[int],
    tensor_indices: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """(bucket_indices, per_bucket_size_limits), as `dist._compute_bucket_assignment_by_size` returns.

    `tensors` are walked in list order; `tensor_indices[i]`, when given, is the label recorded for `tensors[i]`
    (torch passes the parameters already permuted into gradient-ready order plus their original indices)."""
    if not bucket_size_limits:
        raise ValueError("bucket_size_limits must not be empty")
    if tensor_indices and len(tensor_indices) != len(tensors):
        raise ValueError("tensor_indices must label every tensor")
    labels = list(range(len(tensors))) if not tensor_indices else list(tensor_indices)
    open_buckets: dict[tuple, BucketSpec] = {}
    limit_pos: dict[tuple, int] = {}
    result: list[BucketSpec] = []
    for t, idx in zip(tensors, labels):
        key = (t.dtype, t.device)
        bucket = open_buckets.setdefault(key, BucketSpec())
        bucket.indices.append(idx)
        bucket.size_bytes += t.numel() * t.element_size()
        pos = limit_pos.setdefault(key, 0)
        bucket.size_limit = bucket_size_limits[pos]
        if bucket.size_bytes >= bucket.size_limit:
            result.append(bucket)
            open_buckets[key] = BucketSpec()
            limit_pos[key] = min(pos + 1, len(bucket_size_limits) - 1)
    # remaining open buckets, in the order their (dtype, device) first appeared
    result.extend(b for b in open_buckets.values() if b.indices)
    if not tensor_indices:
        result.sort(key=lambda b: b.indices[0])
    return [b.indices for b in result], [b.size_limit for b in result]


def plan_buckets(
    params: Sequence[torch.Tensor],
    *,
    bucket_cap_bytes: int,
    first_bucket_cap_bytes: int,
    order: Sequence[int] | None = None,
) -> list[list[int]]:
    """Bucket plan in launch order. Default order: reverse registration order (gradients of the last layers
    are ready first in backward); `order` replaces it with an observed gradient-ready order."""
    if order is None:
        order = list(range(len(params)))[::-1]
    order = list(order)
    if sorted(order) != list(range(len(params))):
        raise ValueError("bucket order must be a permutation of the parameter indices")
    limits = [first_bucket_cap_bytes, bucket_cap_bytes]
    indices, _ = compute_bucket_assignment_by_size([params[i] for i in order], limits, order)
    return indices


def trainable_parameters(module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """named_modules x named_parameters(recurse=False), shared parameters counted once (torch DDP's walk). Parameters
    sharded by FSDP2 (DTensors) are left out: FSDP2 reduce-scatters their gradients itself."""

    names, params, seen = [], [], set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen or is_sharded(p):
                continue
            seen.add(id(p))
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
            params.append(p)
    return names, params


def iter_tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)
    elif dataclasses.is_dataclass(obj):
        for f in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, f))
