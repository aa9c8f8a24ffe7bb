"""Conformer encoder, speech adapter and splicing into the frozen tower."""

import pytest
import torch

from mm_llama.adapters.speech import (
    ADAPTER_PRESETS,
    CONFORMER_PRESETS,
    ConformerEncoder,
    RotaryAttention,
    SpeechAdapter,
    count_params,
)
from mm_llama.adapters.speech_fusion import FusedSpeechModel
from mm_llama.data.collate import build_example, collate_text, expand_placeholders
from mm_llama.llama import Transformer, get_preset


def debug_models(seed=0):
    torch.manual_seed(seed)
    enc = ConformerEncoder(CONFORMER_PRESETS["debug"])
    ad = SpeechAdapter(enc.out_dim, 64, ADAPTER_PRESETS["debug"])
    tower = Transformer(get_preset("debug"))
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(seed))
    return FusedSpeechModel(tower, enc, ad).eval()


@pytest.mark.parametrize("frames", [1, 3, 4, 5, 7, 8, 97, 101])
def test_lengths_exact_for_odd_clip_lengths(frames):
    m = debug_models()
    x = torch.randn(1, frames, 80)
    emb = m.encode_speech(x, torch.tensor([frames]))
    enc_len = (frames + 3) // 4
    assert emb[0].shape == (((enc_len - 1) // 2 + 1), 64)
    assert m.expected_speech_tokens(torch.tensor([frames])).item() == emb[0].shape[0]


def test_batched_equals_unbatched():
    m = debug_models()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 37, 80, generator=g), torch.randn(1, 90, 80, generator=g)
    batch = torch.zeros(2, 90, 80)
    batch[0, :37], batch[1] = a[0], b[0]
    with torch.no_grad():
        both = m.encode_speech(batch, torch.tensor([37, 90]))
        alone = [m.encode_speech(a, torch.tensor([37]))[0], m.encode_speech(b, torch.tensor([90]))[0]]
    for x, y in zip(both, alone):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_rotary_attention_relative_positions():
    """RoPE scores depend only on the distance between positions; identical tokens give identical outputs."""
    from mm_llama.adapters.speech import _rope
    from mm_llama.llama.model import apply_rope

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    f = _rope(40, 16, 10000.0, "cpu")  # [1, T, K/2]

    def score(m, n):
        return (apply_rope(q, f[:, m : m + 1]) * apply_rope(k, f[:, n : n + 1])).sum().item()

    assert abs(score(3, 7) - score(20, 24)) < 1e-4 and abs(score(3, 7) - score(3, 9)) > 1e-3
    attn = RotaryAttention(32, 4, 10000.0).eval()
    x = torch.randn(1, 1, 32).repeat(1, 6, 1)
    with torch.no_grad():
        y = attn(x, None)
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-5)


def test_splice_and_text_only_equal_tower_and_tower_frozen():
    m = debug_models()
    text = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(m(text), m.tower(text))
    frames = torch.tensor([50, 23])
    n = m.expected_speech_tokens(frames).tolist()
    P = m.placeholder_id
    prompts = [expand_placeholders([1, 7, P, 9], P, [k]) for k in n]
    items = [build_example(p, [20, 21, 22]) for p in prompts]
    batch = collate_text(items, pad_id=0)
    feats = torch.randn(2, 50, 80)
    logits = m(batch["input_ids"], feats, frames)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert (batch["labels"][0, : len(prompts[0])] == -100).all()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    m.train()
    assert not m.tower.training
    before = {k: v.clone() for k, v in m.tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in m.tower.parameters())
    assert all(torch.equal(v, m.tower.state_dict()[k]) for k, v in before.items())
    assert m.adapter.proj.weight.grad is not None and m.encoder.input_proj.weight.grad is not None
    with pytest.raises(ValueError, match="sample 0: 2 speech placeholder tokens but the adapter produced"):
        m(torch.tensor([[1, P, P, 3]]), feats[:1], frames[:1])


def test_paper_preset_parameter_counts():
    with torch.device("meta"):
        enc = ConformerEncoder(CONFORMER_PRESETS["paper"])
        ad = SpeechAdapter(enc.out_dim, get_preset("llama3_1_8b").dim, ADAPTER_PRESETS["paper"])
    assert 0.9e9 < count_params(enc) < 1.1e9
    assert 85e6 < count_params(ad) < 115e6


@pytest.mark.parametrize("frames", [1, 2, 3, 7, 50, 51])
def test_frame_stacking_lengths_and_padding(frames):
    """stack=2 (Whisper's 20 ms frames -> 80 ms tokens): exact lengths, and padding never leaks into a clip."""
    import dataclasses

    torch.manual_seed(0)
    ad = SpeechAdapter(16, 24, dataclasses.replace(ADAPTER_PRESETS["debug"], stack=2)).eval()
    x = torch.randn(1, frames, 16)
    out, n = ad(x, torch.tensor([frames]))
    want = ((frames + 1) // 2 - 1) // 2 + 1
    assert int(n[0]) == want == int(ad.output_lengths(torch.tensor([frames]))[0])
    padded = torch.cat([x, torch.randn(1, 9, 16)], dim=1)
    out2, n2 = ad(padded, torch.tensor([frames]))
    assert int(n2[0]) == want and torch.allclose(out2[0, :want], out[0, :want], atol=1e-5)
