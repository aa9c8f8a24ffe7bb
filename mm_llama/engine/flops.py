"""FLOPs a training step actually executes, and the device peak they are measured against (honest MFU).

`6 x parameters x tokens` is the FLOP count of full training of a dense model. Adapter training is not that: the
frozen tower and encoders run forward, backward passes through frozen layers only compute input gradients (and only
above the lowest trainable part), weight gradients exist only for trainable weights, the logits are computed only at
labelled positions, and attention is not proportional to parameters at all. `StepFlops` counts what runs:

    with StepFlops() as fl:
        train_step(...)
    fl.total  # forward + backward FLOPs of this rank's step

It watches the torch-level calls that do matrix work (linear, matmul/bmm, scaled-dot-product attention,
convolutions) as they run forward, and for each adds the backward products autograd will execute for it: the input
gradient when the input requires grad, the weight gradient when the weight does (a multiply-add = 2 FLOPs;
elementwise work is not counted, as in torch's own `torch.utils.flop_counter`, which a test checks it against).
Calls made while autograd runs backward (activation-checkpoint recomputation) are not counted: the figure is model
FLOPs (MFU), not hardware FLOPs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def _needs(t: object) -> bool:
    return torch.is_tensor(t) and t.requires_grad


def _linear(args: Args, kwargs: Kwargs, out: torch.Tensor) -> tuple[int, int]:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    f = 2 * _rows(x) * w.shape[0] * w.shape[1]
    return f, f * (_needs(x) + _needs(w))


def _matmul(args: Args, kwargs: Kwargs, out: torch.Tensor) -> tuple[int, int]:
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"] if "other" in kwargs else kwargs["mat2"]
    if a.dim() < 2 or b.dim() < 2:  # vector products are negligible and not what we train with
        return 0, 0
    f = 2 * out.numel() * a.shape[-1]
    return f, f * (_needs(a) + _needs(b))


def _sdpa(args: Args, kwargs: Kwargs, out: torch.Tensor) -> tuple[int, int]:
    q = args[0]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    heads_and_batch = q.numel() // (q.shape[-2] * q.shape[-1])
    s_q, s_k = q.shape[-2], k.shape[-2]
    f = 2 * heads_and_batch * s_q * s_k * (q.shape[-1] + v.shape[-1])  # q @ k^T, then probabilities @ v
    # backward: dv = p^T do, dp = do v^T, dq = ds k, dk = ds^T q (all four whenever any input needs a gradient)
    return f, 2 * f if (_needs(q) or _needs(k) or _needs(v)) else 0


def _conv(args: Args, kwargs: Kwargs, out: torch.Tensor) -> tuple[int, int]:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    # each output element is a dot product of length in_channels/groups x kernel size: w.shape[1:] covers both
    f = 2 * out.numel() * math.prod(w.shape[1:])
    return f, f * (_needs(x) + _needs(w))


# forward FLOPs and the backward FLOPs they imply, from a call's arguments and output
_HANDLERS: dict[Callable[..., Any], Callable[[Args, Kwargs, torch.Tensor], tuple[int, int]]] = {
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    F.scaled_dot_product_attention: _sdpa,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
}


class StepFlops(TorchFunctionMode):
    """Counts forward and implied backward FLOPs of the matrix work run inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.forward = 0
        self.backward = 0
        self.by_op: dict[str, list[int]] = {}  # op name -> [forward, backward]

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __torch_function__(
        self, func: Callable[..., Any], types: Iterable[type], args: Args = (), kwargs: Kwargs | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None and torch.is_tensor(out) and torch._C._current_graph_task_id() == -1:
            fwd, bwd = handler(args, kwargs, out)
            bwd = bwd if torch.is_grad_enabled() else 0
            self.forward += fwd
            self.backward += bwd
            tally = self.by_op.setdefault(getattr(func, "__name__", str(func)), [0, 0])
            tally[0] += fwd
            tally[1] += bwd
        return out


# dense tensor-core peaks from the vendors' spec sheets, FLOP/s per device (bf16/fp16; fp32 without TF32)
_GPU_PEAKS = {
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
}


@functools.cache
def measured_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls on the CPU with this process's threads (a measured peak)."""
    g = torch.Generator().manual_seed(0)  # its own: measuring must not move the run's random stream
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    _ = a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(
    device: torch.device | str, dtype: torch.dtype = torch.float32, override_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOP/s of one device for `dtype`, where the figure comes from); `override_tflops` (a user's setting,
    e.g. the recipe's `peak_tflops`) wins over the spec sheet and the measurement."""
    if override_tflops:
        return override_tflops * 1e12, "set by the user"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks.get(dtype, peaks[torch.float32]), f"spec sheet ({name}, {dtype})"
        return 989e12, f"unknown GPU {name}: H100 bf16 spec assumed; set peak_tflops"
    return measured_matmul_peak(dtype), f"measured {dtype} matmul, {torch.get_num_threads()} threads"
