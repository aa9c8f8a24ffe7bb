"""Logits of our tower vs transformers' LlamaForCausalLM, loaded through the production loader."""

import json

import pytest
import torch

from mm_llama.llama import load_pretrained, save_meta
from mm_llama.llama.checkpoint import args_from_meta_params, permute_hf_to_meta, permute_meta_to_hf

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa2_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_untied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "gqa4_llama3_scaling": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama32_like_scaling32_tied": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


def make_hf(name, seed=0):
    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=10000.0,
    )
    kw.update(CONFIGS[name])
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so they are actually tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_logits_match(tmp_path, name):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_pretrained(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, 300, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == ref.shape == (2, 150, 300)
    assert (got - ref).abs().max().item() <= 1e-5
    assert not any(p.requires_grad for p in ours.parameters())
    assert not ours.training
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


def test_hf_sharded_safetensors(tmp_path):
    hf = make_hf("gqa2_tied", seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


def test_transformers4_style_config(tmp_path):
    """Older config.json files carry `rope_theta`/`rope_scaling` at top level instead of `rope_parameters`."""
    hf = make_hf("gqa4_llama3_scaling", seed=4)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = rp
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path)
    assert ours.args.rope_scaling is not None and ours.args.rope_scaling.factor == 8.0
    tokens = torch.randint(0, 300, (1, 100))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


def test_qk_permutation_roundtrip():
    w = torch.randn(8 * 16, 64)
    assert torch.equal(permute_hf_to_meta(permute_meta_to_hf(w, 8), 8), w)


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_roundtrip(tmp_path, mp):
    hf = make_hf("gqa4_llama3_scaling", seed=5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_pretrained(tmp_path / "hf")
    save_meta(ours, tmp_path / "meta", model_parallel=mp)
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == mp
    back = load_pretrained(tmp_path / "meta")
    assert back.args == ours.args
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    tokens = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        assert (back(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


def test_meta_params_ffn_rounding(tmp_path):
    """Meta's FFN width formula: multiple_of-rounded ffn_dim_multiplier * 8 dim / 3 (Llama 3.1 8B: 14336)."""

    a = args_from_meta_params(
        dict(
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            vocab_size=128256,
            multiple_of=1024,
            ffn_dim_multiplier=1.3,
            norm_eps=1e-5,
            rope_theta=500000.0,
            use_scaled_rope=True,
        )
    )
    assert a.ffn_dim == 14336 and a.rope_scaling.factor == 8.0
    a70 = args_from_meta_params(
        dict(
            dim=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            vocab_size=128256,
            multiple_of=4096,
            ffn_dim_multiplier=1.3,
            norm_eps=1e-5,
            rope_theta=500000.0,
            use_scaled_rope=True,
        )
    )
    assert a70.ffn_dim == 28672
