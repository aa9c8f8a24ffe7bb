"""Data-parallel training with bucketed gradient all-reduce overlapped with backward (PyTorch DDP paper, §3-4).

Every rank holds a full replica. Only TRAINABLE parameters (requires_grad=True) take part: a frozen tower is
never broadcast, bucketed or hooked, since every rank loads it from the same checkpoint.

Buckets. Trainable parameters are grouped into flat buffers per (dtype, device), in reverse registration order
(the last layers' gradients are ready first), closing a bucket once it reaches the first cap (1 MiB) or the cap
(the rest); `buckets.py` has the rule (same as torch's `_compute_bucket_assignment_by_size`). The default cap,
`bucket_cap_mb="auto"`, probes the link with one all-reduce at start-up: where every trainable gradient would cross
it in under 100 ms it keeps torch's plan, else buckets of about 1/32 of the gradient bytes within [1, 25] MiB
(`auto_bucket_caps`); a number gives torch's plan for that cap exactly. Each parameter's
gradient is a view into its bucket (`gradient_as_bucket_view=True`), so no second gradient copy exists. After the
first synchronised backward the plan can be rebuilt once from the observed gradient-ready order (rank 0's order
is broadcast so all ranks agree).

Timeline of one synchronised backward on one rank (B0 is launched first):

    autograd     |--grads L..--|--grads ...--|--grads ...--|--grads ..0--|  queue_callback: finalize
    bucket B0    [ready]--> all_reduce(B0) ======>                          |
    bucket B1                  [ready]--> all_reduce(B1) ======>            |
    bucket B2                               [ready]--> all_reduce(B2) =====|==>
    bucket B3                                            [ready]-----------|--> all_reduce(B3) ==>
                                                                            wait(B0..B3) -> grads averaged
    (=== communication running in the background while autograd keeps computing earlier layers' grads)

- A `post_accumulate_grad_hook` per parameter fires once its `.grad` is final for this backward. Without a comm
  hook the gradient is multiplied by 1/world_size while being copied into the bucket (or divided in place when
  `.grad` already is the bucket view); then the bucket's pending count drops.
- A bucket whose count reaches zero is launched with `all_reduce(SUM, async_op=True)` -- but strictly in bucket
  order: a later bucket that becomes ready first waits for its predecessors, so every rank issues the same
  collectives in the same order (otherwise ranks would deadlock or mix up buffers).
- The first hook of a backward queues a callback on the autograd engine that runs when backward ends: it checks
  that every trainable parameter received a gradient, waits for all outstanding work and finalises the grads.

Gradient accumulation: inside `no_sync()` (forward and backward both inside; the flag is read at forward time)
hooks only accumulate locally; the next synchronised backward reduces the accumulated gradients.

Unused parameters. With `find_unused_parameters=False` a trainable parameter that got no gradient makes the end of
that backward raise an error naming it (torch's DDP silently skips the reduction there, pytorch #128949). The
remaining buckets are still reduced first so the other ranks are not left waiting in a collective. With
`find_unused_parameters=True` the forward's autograd graph is traversed, unreached parameters are marked ready
(zeros) at the start of backward, and a locally-used bitmap is all-reduced at the end: a parameter no rank used
keeps its `.grad` untouched (None stays None), one used by some ranks gets the average.

World size 1 runs the same code without communication.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed import ProcessGroup

from .buckets import auto_bucket_caps, iter_tensors, plan_buckets, trainable_parameters
from .comm import (
    CommHook,
    broadcast,
    global_rank,
    probe_link,
    resolve_comm_hook,
    verify_same_parameters,
)

MiB = 1024 * 1024


class _Bucket:
    __slots__ = ("index", "param_indices", "buffer", "pending", "handle")

    def __init__(self, index: int, param_indices: list[int], buffer: torch.Tensor) -> None:
        self.index = index
        self.param_indices = param_indices
        self.buffer = buffer
        self.pending = len(param_indices)
        self.handle: Any = None  # the comm hook's handle of the bucket's reduction in flight


class DistributedDataParallel(nn.Module):
    """Drop-in for `torch.nn.parallel.DistributedDataParallel` on adapter-training workloads (see module doc)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        process_group: ProcessGroup | None = None,
        bucket_cap_mb: float | str = "auto",
        first_bucket_cap_mb: float | None = None,
        gradient_as_bucket_view: bool = True,
        find_unused_parameters: bool = False,
        broadcast_buffers: bool = False,
        comm_hook: str | CommHook[Any] | None = None,
        rebuild_buckets: bool = True,
    ) -> None:
        # long: the engine's set-up in the DDP paper's order (parameters, rank-0 broadcast, link probe, buckets, hooks)
        super().__init__()
        self.module = module
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        self.rank = dist.get_rank(process_group) if process_group is not None else 0
        self.param_names, self.params = trainable_parameters(module)
        if not self.params:
            raise ValueError(
                "DistributedDataParallel: the module has no parameter with requires_grad=True (that "
                "FSDP2 does not shard)"
            )
        if bucket_cap_mb != "auto" and not (isinstance(bucket_cap_mb, int | float) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number of MiB or 'auto', not {bucket_cap_mb!r}")
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self.comm_hook = resolve_comm_hook(comm_hook)
        self.require_backward_grad_sync = True
        self._index = {id(p): i for i, p in enumerate(self.params)}
        if self.world_size > 1:
            verify_same_parameters(self.param_names, self.params, self.process_group, self.world_size)
            broadcast(self.params, self.process_group)
            if broadcast_buffers:
                broadcast(list(module.buffers()), self.process_group)
        self.comm_probe_s: float | None = None  # "auto": measured all-reduce time of every trainable gradient
        if bucket_cap_mb == "auto":  # sized from the trainable gradients and the link (buckets.auto_bucket_caps)
            if self.world_size > 1:
                self.comm_probe_s = probe_link(self.params, self.process_group)
            self.bucket_cap_bytes, first = auto_bucket_caps(self.params, self.comm_probe_s)
        else:
            self.bucket_cap_bytes, first = int(bucket_cap_mb * MiB), MiB  # torch's rule: 1 MiB first
        self.first_bucket_cap_bytes = first if first_bucket_cap_mb is None else int(first_bucket_cap_mb * MiB)

        n = len(self.params)
        self._ready = [False] * n
        self._used_since_sync = [False] * n
        self._reached: set[int] | None = None
        self._ready_order: list[int] = []
        self._rebuilt = not rebuild_buckets or find_unused_parameters  # torch rebuilds only without find-unused
        self._backward_active = False
        self._sync_this_backward = True
        self._next_launch = 0
        self._build_buckets(order=None)
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, i))
            for i, p in enumerate(self.params)
        ]

    # --- set-up -------------------------------------------------------------------------------
    def _build_buckets(self, order: list[int] | None) -> None:
        plan = plan_buckets(
            self.params,
            bucket_cap_bytes=self.bucket_cap_bytes,
            first_bucket_cap_bytes=self.first_bucket_cap_bytes,
            order=order,
        )
        self.buckets: list[_Bucket] = []
        self._bucket_of = [0] * len(self.params)
        views: dict[int, torch.Tensor] = {}  # every parameter is in one bucket
        for bi, idxs in enumerate(plan):
            ref = self.params[idxs[0]]
            buf = torch.zeros(sum(self.params[i].numel() for i in idxs), dtype=ref.dtype, device=ref.device)
            offset = 0
            for i in idxs:
                p = self.params[i]
                view = buf[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
                self._bucket_of[i] = bi
                views[i] = view
                if self.gradient_as_bucket_view and p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = view
            self.buckets.append(_Bucket(bi, idxs, buf))
        self._view_of = [views[i] for i in range(len(self.params))]

    def remove_hooks(self) -> None:
        """Detach the engine from the module's parameters (the module can then be wrapped again)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def bucket_plan(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order."""
        return [[self.param_names[i] for i in b.param_indices] for b in self.buckets]

    # --- forward ------------------------------------------------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; put both forward and backward inside the context."""
        old = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        fsdp = getattr(self.module, "set_requires_gradient_sync", None)  # units FSDP2 shards inside the module
        if fsdp is not None:
            fsdp(False)
        try:
            yield
        finally:
            self.require_backward_grad_sync = old
            if fsdp is not None:
                fsdp(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        if grad and self.require_backward_grad_sync and not self._rebuilt and self._ready_order:
            self._rebuild_from_ready_order()
        self._sync_this_backward = self.require_backward_grad_sync
        if self.broadcast_buffers and self.world_size > 1:
            buffers = list(self.module.buffers())
            if buffers:
                broadcast(buffers, self.process_group)
        out = self.module(*args, **kwargs)
        if grad and self.find_unused_parameters and self._sync_this_backward:
            self._reached = self._reachable_params(out)
        return out

    def _reachable_params(self, out: object) -> set[int]:
        seen: set[Any] = set()  # autograd nodes
        reached: set[int] = set()
        stack = [t.grad_fn for t in iter_tensors(out) if t.grad_fn is not None]
        for t in iter_tensors(out):  # an output that is itself a trainable leaf
            if t.requires_grad and t.grad_fn is None and id(t) in self._index:
                reached.add(self._index[id(t)])
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in self._index:
                reached.add(self._index[id(var)])
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        return reached

    def _rebuild_from_ready_order(self) -> None:
        order = self._ready_order
        if self.world_size > 1:
            box = [order if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=global_rank(self.process_group, 0), group=self.process_group)
            assert box[0] is not None  # rank 0's order, now on every rank
            order = box[0]
        self._build_buckets(order=list(order))
        self._rebuilt = True

    # --- backward -----------------------------------------------------------------------------
    def _start_backward(self) -> None:
        self._backward_active = True
        Variable._execution_engine.queue_callback(self._finalize_backward)
        if not self._sync_this_backward:
            return
        self._ready = [False] * len(self.params)
        for b in self.buckets:
            b.pending = len(b.param_indices)
            b.handle = None
        self._next_launch = 0
        if self.find_unused_parameters:
            if self._reached is None:
                raise RuntimeError(
                    "find_unused_parameters=True: run the forward through the DistributedDataParallel wrapper "
                    "before calling backward"
                )
            for i in range(len(self.params)):
                if i not in self._reached:
                    self._mark_unreached_ready(i)

    def _on_grad_ready(self, i: int, param: torch.Tensor) -> None:
        if not self._backward_active:
            self._start_backward()
        self._used_since_sync[i] = True
        if not self._sync_this_backward:
            return
        if self._ready[i]:
            raise RuntimeError(
                f"parameter {self.param_names[i]!r} received its gradient twice in one backward "
                "(reentrant activation checkpointing or a module run twice with retain_graph?)"
            )
        if not self._rebuilt:
            self._ready_order.append(i)
        self._copy_into_bucket(i, rebind=self.gradient_as_bucket_view)
        self._mark_ready(i)

    def _copy_into_bucket(self, i: int, *, rebind: bool) -> None:
        p, view = self.params[i], self._view_of[i]
        g = p.grad
        scale = self.comm_hook.prescale
        if g is None:
            view.zero_()
        elif g.data_ptr() == view.data_ptr() and g.shape == view.shape:
            if scale and self.world_size > 1:
                view.div_(self.world_size)
        else:
            if scale and self.world_size > 1:
                torch.mul(g, 1.0 / self.world_size, out=view)
            else:
                view.copy_(g)
            if rebind:
                p.grad = view

    def _mark_unreached_ready(self, i: int) -> None:
        p = self.params[i]
        if p.grad is not None and p.grad.data_ptr() == self._view_of[i].data_ptr():
            p.grad = p.grad.clone()  # keep an unused parameter's grad untouched by the reduction
        if not self._rebuilt:
            self._ready_order.append(i)
        self._copy_into_bucket(i, rebind=False)
        self._mark_ready(i)

    def _mark_ready(self, i: int) -> None:
        self._ready[i] = True
        b = self.buckets[self._bucket_of[i]]
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            b = self.buckets[self._next_launch]
            if self.world_size > 1:
                b.handle = self.comm_hook.launch(b.buffer, self.process_group, self.world_size)
            self._next_launch += 1

    def _wait_all(self) -> None:
        for b in self.buckets:
            if b.handle is None:
                continue
            try:
                self.comm_hook.finish(b.handle, b.buffer)
            except Exception as e:
                raise RuntimeError(
                    f"DistributedDataParallel: all-reduce of gradient bucket {b.index} failed on rank {self.rank} "
                    f"(a peer rank died or timed out?): {e}"
                ) from e
            finally:
                b.handle = None

    def _finalize_backward(self) -> None:
        try:
            if not self._sync_this_backward:
                return
            missing = [i for i, r in enumerate(self._ready) if not r]
            if missing:
                # reduce what is left anyway so peers are not left hanging in a collective, then fail loudly
                for i in missing:
                    self._copy_into_bucket(i, rebind=False)
                    self._mark_ready(i)
                self._wait_all()
                names = ", ".join(self.param_names[i] for i in missing[:10])
                more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
                raise RuntimeError(
                    f"DistributedDataParallel (rank {self.rank}): these trainable parameters received no gradient "
                    f"in this backward: {names}{more}. Make them take part in the loss, freeze them "
                    "(requires_grad=False), or pass find_unused_parameters=True (training config: "
                    "find_unused_parameters=true, e.g. for text-only samples in a run)."
                )
            self._wait_all()
            globally_used = None
            if self.find_unused_parameters and self.world_size > 1:
                dev = self.buckets[0].buffer.device
                used = torch.tensor(self._used_since_sync, dtype=torch.int32, device=dev)
                dist.all_reduce(used, group=self.process_group)
                globally_used = (used > 0).tolist()
            elif self.find_unused_parameters:
                globally_used = list(self._used_since_sync)
            self._finalize_grads(globally_used)
            if not self._rebuilt and len(self._ready_order) != len(self.params):
                self._ready_order = []  # an incomplete order cannot rebuild buckets; try again next time
        finally:
            self._backward_active = False
            if self._sync_this_backward:
                self._used_since_sync = [False] * len(self.params)
                self._reached = None

    def _finalize_grads(self, globally_used: list[bool] | None) -> None:
        for i, p in enumerate(self.params):
            if globally_used is not None and not globally_used[i]:
                continue  # nobody used it: leave .grad exactly as it was
            view = self._view_of[i]
            g = p.grad
            if self.gradient_as_bucket_view:
                if g is None or g.data_ptr() != view.data_ptr():
                    p.grad = view
            elif g is None:
                p.grad = view.clone()
            else:
                g.copy_(view)
