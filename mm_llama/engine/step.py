"""The training step as two named functions (torchtitan's shape), for any model that follows the Hugging Face
training convention: `model(**inputs, labels=labels)` returns an object with `.loss_sum` (summed over labelled
tokens) and `.n_tokens`.

    forward_backward(wrapped, micro_batches)  -> (loss sum, labelled tokens) of this rank, gradients accumulated
    train_step(wrapped, optimizer, ...)       -> one optimizer step: forward_backward, global loss, clip, step

The loss is normalised by the GLOBAL number of labelled tokens of the step (all ranks, all micro-batches), so the
DDP average of the gradients is the gradient of the global token mean, whatever the split across ranks and
micro-batches. The count is read from the labels on the host before the forward and all-reduced once per step.
Micro-batches before the last run under `no_sync()` (gradients accumulate locally, one all-reduce per step).
Side concerns (profiling, metrics, checkpoints, fault injection) live outside, in the recipe's loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from .shard import is_sharded


@dataclass
class StepResult:
    loss: float  # global mean over labelled tokens (nan/inf: the step was skipped)
    tokens: int  # labelled tokens on this rank
    grad_norm: float = float("nan")
    skipped: bool = False


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def labelled_tokens(batch: dict) -> int:
    """Positions whose next token is a label (what the model's loss sums over)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _global_count(n: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t)
    return int(t.item())


def forward_backward(
    wrapped: torch.nn.Module,
    micro_batches: Iterable[dict],
    *,
    device: torch.device,
    grad_accum: int,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Forward + backward of `grad_accum` micro-batches (dicts with input_ids, labels and the model's inputs).
    Returns this rank's summed loss and labelled-token count."""
    batches = iter(micro_batches)
    micro = [next(batches) for _ in range(grad_accum)]
    tokens = sum(labelled_tokens(b) for b in micro)
    n_global = _global_count(tokens, device)  # one collective per step, before any forward
    total_loss = 0.0
    for i, batch in enumerate(micro):
        batch = _to(batch, device)
        last = i == grad_accum - 1
        no_sync = getattr(wrapped, "no_sync", None)  # a data-parallel wrapper's
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with sync, amp:
            out = wrapped(**batch)
            # the DDP average over ranks then equals the gradient of the global token mean; auxiliary losses (in
            # the same summed units) are added to the objective, the reported loss stays the token loss
            objective = out.loss_sum if getattr(out, "aux_sum", None) is None else out.loss_sum + out.aux_sum
            (objective * world_size / max(n_global, 1)).backward()
        total_loss += float(out.loss_sum.detach())
    return total_loss, tokens


def train_step(
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    micro_batches: Iterable[dict],
    trainable: list[torch.nn.Parameter],
    *,
    device: torch.device,
    grad_accum: int = 1,
    clip: float = 1.0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    loss_hook: Callable[[float], float] | None = None,
) -> StepResult:
    """One optimizer step. A non-finite global loss skips the update (gradients dropped) and says so."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = forward_backward(
        wrapped,
        micro_batches,
        device=device,
        grad_accum=grad_accum,
        world_size=world_size,
        autocast_dtype=autocast_dtype,
    )
    sums = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss = float(sums[0] / max(float(sums[1]), 1.0))
    if loss_hook is not None:  # fault injection in tests
        loss = loss_hook(loss)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, tokens, skipped=True)
    grad_norm = clip_grad_norm(trainable, clip)
    optimizer.step()
    scheduler.step()
    return StepResult(loss, tokens, grad_norm)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_ over replicated parameters and FSDP2-sharded ones (DTensors: each norm is the whole
    tensor's, reduced across ranks) together; returns the total norm before clipping."""

    groups = [[p for p in params if is_sharded(p) == sharded and p.grad is not None] for sharded in (False, True)]
    if not groups[1]:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = []
    for group in groups:
        if group:
            n = torch.nn.utils.get_total_norm([g for p in group if (g := p.grad) is not None])
            norms.append(n.full_tensor() if is_sharded(n) else n)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for group in groups:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """A saved LambdaLR state into this run's scheduler, and each group's rate set for the saved step (what the
    scheduler's last step set). With another number of parameter groups (sharded blocks apart from plain ones on
    another world size) only the step is restored: the schedule is a function of the step."""
    if len(saved.get("base_lrs", [])) == len(scheduler.base_lrs):
        scheduler.load_state_dict(saved)
    else:
        scheduler.last_epoch = int(saved["last_epoch"])
    groups, step = scheduler.optimizer.param_groups, scheduler.last_epoch
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in groups]  # pyright: ignore[reportAttributeAccessIssue] - torch keeps it private
