"""The MFU numerator: FLOPs a training step executes, checked against torch's own FLOP counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mm_llama.engine.flops import StepFlops, device_peak_flops
from tests import tiny
from tests.unit.test_composed import inputs, media_kwargs  # noqa: F401  (fixtures)


def count_both(model, run):
    """(ours, torch's) FLOPs of forward + backward of `run(model)` -> loss. Attention runs on the math backend:
    torch's counter has no entry for the CPU flash-attention kernel, but counts the math path's batched matmuls."""
    with sdpa_kernel(SDPBackend.MATH), StepFlops() as ours:
        run(model).backward()
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as ref:
        run(model).backward()
    model.zero_grad(set_to_none=True)
    return ours, ref


def conv_flops(ours: StepFlops, ref: FlopCounterMode) -> tuple[int, int]:
    mine = sum(sum(v) for k, v in ours.by_op.items() if k.startswith("conv"))
    theirs = sum(v for k, v in ref.get_flop_counts()["Global"].items() if "convolution" in str(k))
    return mine, theirs


def labelled(ids):
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return labels


@pytest.mark.parametrize("kind", ["image", "video", "speech"])
def test_step_flops_match_torch_flop_counter(inputs, kind):  # noqa: F811
    model = tiny.model()
    model.requires_grad_(False)
    trainable = {
        "image": model.image.cross_attention_layers,
        "video": model.video.video_cross_attention_layers,
        "speech": model.speech,
    }[kind]
    trainable.requires_grad_(True)
    ids, media = inputs[kind]
    ids = ids.repeat(2, 1)
    kw = media_kwargs(model, kind, ids, media)
    kw = {k: (v * 2 if isinstance(v, list) else torch.cat([v, v])) for k, v in kw.items()}

    def run(m):
        return m(ids, labels=labelled(ids), **kw).loss

    ours, ref = count_both(model, run)
    trainable.requires_grad_(False)
    assert ours.backward > 0 and ours.forward > 0
    mine, theirs = conv_flops(ours, ref) if kind == "speech" else (0, 0)  # depthwise: see test_convolution_flops
    assert ours.total - mine == ref.get_total_flops() - theirs, (ours.by_op, ref.get_flop_counts()["Global"])


@pytest.mark.parametrize("groups", [1, 64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("input_grad", [False, True])
def test_convolution_flops(groups, stride, input_grad):
    """Plain convolutions match torch's counter; for grouped ones torch's backward formula ignores `groups`
    (it counts a dense c_out x c_in filter), so there the backward must be exactly the forward per gradient."""
    conv = torch.nn.Conv1d(64, 128 if groups == 1 else 64, 5, stride=stride, padding=2, groups=groups)
    x = torch.randn(2, 64, 37, requires_grad=input_grad)
    with StepFlops() as ours:
        conv(x).sum().backward()
    with FlopCounterMode(display=False) as ref:
        conv(x).sum().backward()
    assert ours.backward == ours.forward * (1 + input_grad)
    if groups == 1:
        assert ours.total == ref.get_total_flops()


def test_no_backward_below_the_lowest_trainable_part(tiny_tower, inputs):  # noqa: F811
    """Frozen everything: forward only; a trainable top block: backward only above it."""
    tower = tiny_tower
    ids = inputs["text"][0]
    with StepFlops() as frozen:
        tower(ids)
    assert frozen.backward == 0
    with torch.no_grad(), StepFlops() as nograd:
        tower(ids)
    assert nograd.forward == frozen.forward and nograd.backward == 0


def test_device_peak_is_measured_on_cpu():
    peak, source = device_peak_flops("cpu")
    assert peak > 1e8 and "measured" in source
    assert device_peak_flops("cpu", override_tflops=2.5) == (2.5e12, "set by the user")
