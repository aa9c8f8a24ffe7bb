"""Training engine: process-group set-up and the bucketed-overlap DDP wrapper."""

from .buckets import compute_bucket_assignment_by_size, plan_buckets
from .comm import AllReduceHook, CompressHook
from .ddp import DistributedDataParallel
from .dist import DistInfo, destroy_distributed, exit_process, init_distributed

__all__ = [
    "AllReduceHook",
    "CompressHook",
    "DistInfo",
    "DistributedDataParallel",
    "compute_bucket_assignment_by_size",
    "destroy_distributed",
    "exit_process",
    "init_distributed",
    "plan_buckets",
]
