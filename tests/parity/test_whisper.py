"""Whisper encoder: our module vs transformers' WhisperEncoder, from the real tiny.en (CTranslate2) and from a
tiny random HF folder; Whisper log-mel vs WhisperFeatureExtractor; no 30 s padding, batch-independent outputs."""

import numpy as np
import pytest
import torch

from mm_llama.adapters.ctranslate2 import CT2FormatError, read_ct2
from mm_llama.adapters.whisper import load_whisper_encoder, whisper_log_mel
from mm_llama.assets import asset_path

transformers = pytest.importorskip("transformers")


def hf_encoder_like(ours):
    a = ours.args
    cfg = transformers.WhisperConfig(
        num_mel_bins=a.n_mels,
        d_model=a.width,
        encoder_layers=a.layers,
        encoder_attention_heads=a.heads,
        encoder_ffn_dim=a.ffn_dim,
        max_source_positions=a.n_ctx,
    )
    hf = transformers.models.whisper.modeling_whisper.WhisperEncoder(cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    return hf


@pytest.fixture(scope="module")
def tiny_en():
    return load_whisper_encoder(asset_path("whisper_tiny_en_ct2"))


def test_real_tiny_en_from_ctranslate2_matches_transformers(tiny_en):
    a = tiny_en.args
    assert (a.width, a.layers, a.heads, a.ffn_dim, a.n_ctx) == (384, 4, 6, 1536, 1500)
    hf = hf_encoder_like(tiny_en)
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
        got, lengths = tiny_en(mel)
    assert lengths.tolist() == [1500, 1500]
    assert (got - ref).abs().max().item() <= 1e-4


def test_tiny_random_hf_folder(tmp_path):
    cfg = transformers.WhisperConfig(
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        vocab_size=100,
        max_source_positions=1500,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.WhisperModel(cfg).eval()
    model.save_pretrained(tmp_path)
    ours = load_whisper_encoder(tmp_path)
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert (ours(mel)[0] - model.encoder(mel).last_hidden_state).abs().max().item() <= 1e-5


def test_short_clips_unpadded_and_batch_independent(tiny_en):
    g = torch.Generator().manual_seed(1)
    short, long = torch.randn(1, 80, 301, generator=g), torch.randn(1, 80, 517, generator=g)
    batch = torch.zeros(2, 80, 517)
    batch[0, :, :301], batch[1] = short[0], long[0]
    with torch.no_grad():
        alone_s, ls = tiny_en(short)
        alone_l, _ = tiny_en(long)
        both, lengths = tiny_en(batch, torch.tensor([301, 517]))
    assert ls.tolist() == [151] and lengths.tolist() == [151, 259]
    assert torch.allclose(both[0, :151], alone_s[0], atol=1e-5)
    assert torch.allclose(both[1], alone_l[0], atol=1e-5)
    with pytest.raises(ValueError, match="30 s"):
        tiny_en(torch.zeros(1, 80, 3002))


def test_whisper_log_mel_matches_feature_extractor():
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    wave = (np.random.default_rng(0).standard_normal(16000 * 2 + 123) * 0.1).astype(np.float32)
    ref = fe(wave, sampling_rate=16000, return_tensors="pt", padding=False).input_features[0]
    got = whisper_log_mel(torch.from_numpy(wave))
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_ct2_reader_errors(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\x00\x00\x00\x05\x00Whis")
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(bad)
    bad.write_bytes(b"\x63\x00\x00\x00")
    with pytest.raises(CT2FormatError, match="unsupported CTranslate2 binary version 99"):
        read_ct2(bad)
