"""The DDP engine's communication (mm_llama/engine/ddp.py): how a bucket is reduced (comm hooks), and the start-up
collectives (every rank checks that all ranks train the same tensors, rank 0's values are broadcast, the link is
timed once to size the buckets)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

from .buckets import trainable_bytes

MiB = 1024 * 1024
H = TypeVar("H")


class CommHook(Protocol[H]):
    """How the engine reduces a bucket: `launch` starts the (asynchronous) reduction of the flat gradient buffer and
    returns a handle; `finish(handle, buffer)` waits for it and leaves the averaged gradients in `buffer`.
    `prescale`: the engine divides the gradients by the world size while copying them into the bucket."""

    prescale: bool

    def launch(self, buffer: torch.Tensor, group: ProcessGroup | None, world_size: int) -> H: ...

    def finish(self, handle: H, buffer: torch.Tensor) -> None: ...


class AllReduceHook:
    """Plain SUM all-reduce of a bucket pre-scaled by 1/world_size (torch DDP's default numerics)."""

    prescale = True

    def launch(self, buffer: torch.Tensor, group: ProcessGroup | None, world_size: int) -> Work | None:
        return dist.all_reduce(buffer, group=group, async_op=True)  # None: this rank is not in the group

    def finish(self, handle: Work | None, buffer: torch.Tensor) -> None:
        if handle is not None:
            handle.wait()


class CompressHook:
    """Cast the bucket to a 16-bit dtype, divide by world size, all-reduce, cast back
    (same numerics as torch's `fp16_compress_hook` / `bf16_compress_hook`)."""

    prescale = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def launch(
        self, buffer: torch.Tensor, group: ProcessGroup | None, world_size: int
    ) -> tuple[Work | None, torch.Tensor]:
        compressed = buffer.to(self.dtype).div_(world_size)
        return dist.all_reduce(compressed, group=group, async_op=True), compressed

    def finish(self, handle: tuple[Work | None, torch.Tensor], buffer: torch.Tensor) -> None:
        work, compressed = handle
        if work is not None:  # None: this rank is not in the group (nothing to wait for, as AllReduceHook)
            work.wait()
        buffer.copy_(compressed)


def resolve_comm_hook(hook: str | CommHook[Any] | None) -> CommHook[Any]:
    if hook is None or hook == "allreduce":
        return AllReduceHook()
    if hook in ("bf16", "bfloat16"):
        return CompressHook(torch.bfloat16)
    if hook in ("fp16", "float16"):
        return CompressHook(torch.float16)
    if not isinstance(hook, str) and hasattr(hook, "launch") and hasattr(hook, "finish"):
        return hook
    raise ValueError(
        f"unknown comm_hook {hook!r}: use None/'allreduce', 'bf16', 'fp16' or an object with launch/finish"
    )


# ----------------------------------------------------------------------------------------------


def probe_link(params: Sequence[torch.Tensor], group: ProcessGroup | None, probe_bytes: int = 16 * MiB) -> float:
    """Seconds to all-reduce every trainable gradient on this link, extrapolated from the best of 3 all-reduces
    of one probe buffer (after a warm-up); the slowest rank's estimate, so every rank plans the same buckets."""
    total = trainable_bytes(params)
    ref = params[0]
    n = max(1, min(total, probe_bytes) // ref.element_size())
    buf = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    best = float("inf")
    for i in range(4):
        if ref.device.type == "cuda":
            torch.cuda.synchronize(ref.device)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        if ref.device.type == "cuda":
            torch.cuda.synchronize(ref.device)
        if i:
            best = min(best, time.perf_counter() - t0)
    est = torch.tensor([best * total / (n * ref.element_size())], dtype=torch.float64, device=ref.device)
    dist.all_reduce(est, op=dist.ReduceOp.MAX, group=group)
    return float(est.item())


def global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else 0


def verify_same_parameters(
    names: Sequence[str], params: Sequence[torch.Tensor], group: ProcessGroup | None, world_size: int
) -> None:
    """Every rank trains the same tensors (names, shapes, dtypes), or an error names the first difference."""
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params)]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    ref = gathered[0]
    for r, theirs in enumerate(gathered[1:], start=1):
        if theirs == ref:
            continue
        for j in range(max(len(ref), len(theirs))):
            a = ref[j] if j < len(ref) else None
            b = theirs[j] if j < len(theirs) else None
            if a != b:
                raise RuntimeError(
                    "DistributedDataParallel: trainable parameters differ across ranks at position "
                    f"{j}: rank 0 has {a} and rank {r} has {b} (name, shape, dtype); every rank must build "
                    f"the same model (rank 0: {len(ref)} trainable tensors, rank {r}: {len(theirs)})"
                )


@torch.no_grad()
def broadcast(tensors: Sequence[torch.Tensor], group: ProcessGroup | None, chunk_bytes: int = 256 * MiB) -> None:
    """Rank 0's values of `tensors` on every rank (flat chunks per dtype and device)."""
    src = global_rank(group, 0)
    kinds: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.dtype, t.device), []).append(t)
    for same in kinds.values():
        chunk, size = [], 0
        for t in same + [None]:
            if t is not None:
                chunk.append(t)
                size += t.numel() * t.element_size()
            if chunk and (t is None or size >= chunk_bytes):
                flat = torch.cat([c.detach().reshape(-1) for c in chunk])
                dist.broadcast(flat, src=src, group=group)
                offset = 0
                for c in chunk:
                    c.copy_(flat[offset : offset + c.numel()].view_as(c))
                    offset += c.numel()
                chunk, size = [], 0
