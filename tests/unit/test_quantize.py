"""Low-precision decoding: int8 weight-only tower linears (torch's own kernel) and bf16, through load_pretrained."""

import pytest
import torch

from mm_llama.assets import asset_path
from mm_llama.generate import generate_ids
from mm_llama.llama import load_pretrained
from mm_llama.llama.quantize import Int8WeightOnlyLinear, quantize_int8
from tests import tiny


def test_int8_linear_matches_its_dequantised_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int8WeightOnlyLinear(lin.weight, torch.bfloat16)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (96,)
    x = torch.randn(3, 5, 64)
    want = x.bfloat16().float() @ (q.qweight.float() * q.scale.float()[:, None]).T
    got = q(x)
    assert got.dtype == x.dtype and got.shape == (3, 5, 96)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # per-channel rounding error is at most half a step of that channel's scale
    err = (q.qweight.float() * q.scale.float()[:, None] - lin.weight).abs().max(dim=1).values
    assert bool((err <= q.scale.float() * 0.51 + 1e-3).all())


def test_quantize_replaces_every_tower_linear():
    tower = tiny.tower(n_layers=2)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tower.modules())
    quantize_int8(tower, torch.float32)
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in tower.modules()) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in tower.modules())


@pytest.mark.parametrize("kw", [{"quantize": "int4"}, {"quantize": "int8", "requires_grad": True}])
def test_bad_quantize_options_are_named(kw):
    with pytest.raises(ValueError, match="quantize"):
        load_pretrained(asset_path("smollm2_gguf"), **kw)


@pytest.mark.parametrize("mode", [(torch.bfloat16, None), (torch.bfloat16, "int8")])
def test_low_precision_greedy_text_follows_fp32(smollm, smollm_tok, mode):
    """The real SmolLM2 in bf16 / int8: the first 16 greedy tokens of a prompt mostly agree with fp32
    (benchmarks/generate.py measures the agreement over 8 prompts x 32 tokens)."""
    dtype, quantize = mode
    low = load_pretrained(asset_path("smollm2_gguf"), dtype=dtype, quantize=quantize)
    prompts = [smollm_tok.encode(p) for p in ("The capital of France is", "Water boils at")]
    ref = generate_ids(smollm, prompts, max_new_tokens=16)
    got = generate_ids(low, prompts, max_new_tokens=16)
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    assert same >= 0.75 * 32, (ref, got)
    assert smollm_tok.decode(got[0]).strip().startswith("Paris")
