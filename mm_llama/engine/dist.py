"""Process-group set-up from the environment that torchrun / `accelerate launch` provide.

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT  ->  init_process_group(nccl | gloo)

Not launched distributed (no WORLD_SIZE or WORLD_SIZE=1 without MASTER_ADDR): nothing is initialised and the
helpers report rank 0 of 1, so the same training code runs as a single process.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def launched_distributed() -> bool:
    return _env_int("WORLD_SIZE", 1) > 1 or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)


def init_distributed(
    backend: str | None = None,
    timeout_s: float | None = None,
    device: str | None = None,
) -> DistInfo:
    """Initialise the default process group from the environment (idempotent).

    backend: "nccl" when CUDA is available, else "gloo" (override with the argument or MM_LLAMA_BACKEND).
    timeout_s: collective timeout; a dead peer surfaces as an exception within it (MM_LLAMA_PG_TIMEOUT).
    device: "cpu" forces CPU even with CUDA present.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev, dist.get_backend())
    if not launched_distributed():
        return DistInfo(0, 1, 0, 1, dev, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun or accelerate launch")
    backend = backend or os.environ.get("MM_LLAMA_BACKEND") or ("nccl" if use_cuda else "gloo")
    timeout = float(timeout_s or os.environ.get("MM_LLAMA_PG_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
        device_id=dev if backend == "nccl" else None,  # None: torch's default
    )
    atexit.register(destroy_distributed)
    return DistInfo(rank, world, local_rank, local_world, dev, backend)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass


def exit_process(code: int = 0) -> None:
    """End a process that used a process group: tear the group down, flush, and leave WITHOUT the interpreter's
    C++ static teardown. torch 2.11 + gloo sometimes aborts there ("terminate called without an active
    exception", no Python frame), torch's own DDP included, which would turn a finished run into a crash."""

    destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
