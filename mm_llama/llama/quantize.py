"""Weight-only int8 for decoding: every tower linear keeps int8 weights and one scale per output channel.

Batch-1 decoding streams every weight once per token, so its speed is set by bytes per weight: int8 reads a quarter
of fp32's bytes and half of bf16's. The matrix product is torch's own int8 weight-only kernel
(`aten._weight_int8pack_mm`: activations in bf16/fp16/fp32, int8 weights, per-channel scales); where a build has no
such kernel for the device, the weights are dequantised per call (correct, not faster). Symmetric per-channel
rounding, as in torchao's int8 weight-only scheme: w ~= scale[o] * q[o, i], q in [-127, 127].

For inference only: there is no backward through the kernel, and the training recipe has no quantize option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_MODES = ("int8",)


class Int8WeightOnlyLinear(nn.Module):
    """`y = x @ (scale * q).T` with q int8 [out, in] and scale [out] in the compute dtype (no bias: Llama has none)."""

    qweight: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self._kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if self._kernel:
            try:
                y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
                return y.reshape(*shape[:-1], self.out_features).to(dtype)
            except (NotImplementedError, RuntimeError):  # no kernel for this device/dtype in this build
                self._kernel = False
        y = F.linear(x2, self.qweight.to(x2.dtype) * self.scale[:, None])
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


@torch.no_grad()
def quantize_int8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `nn.Linear` without bias in `model` by an int8 weight-only linear, in place; returns `model`.

    A tied output projection gets its own int8 copy (the embedding lookup keeps the original table)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Int8WeightOnlyLinear(lin.weight, compute_dtype or lin.weight.dtype).to(lin.weight.device)
        setattr(parent, attr, q)
    # torch types nn.Module.__setattr__'s value as a tensor or module; a plain attribute is stored as any object
    model.quantized = "int8"  # pyright: ignore[reportArgumentType]
    return model
