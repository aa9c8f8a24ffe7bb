"""Conformer encoder, speech adapter and splicing into the frozen tower."""

import dataclasses

import pytest
import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import init_part_from_file, load_composed, save_part
from mm_llama.adapters.modalities.speech import cache_encoder_outputs, encode_speech
from mm_llama.adapters.samples import SampleOptions, Samples
from mm_llama.adapters.speech import (
    ADAPTER_PRESETS,
    CONFORMER_PRESETS,
    ConformerEncoder,
    RotaryAttention,
    SpeechAdapter,
    _rope,
    count_params,
)
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.data.audio import decode_audio, log_mel
from mm_llama.data.badsamples import SampleError
from mm_llama.data.collate import build_example, collate_text, expand_placeholders
from mm_llama.data.shards import read_index, read_samples
from mm_llama.data.writer import write_shards
from mm_llama.llama import get_preset
from mm_llama.llama.model import apply_rope
from tests import tiny


def debug_models(seed=0, **kw) -> ComposedModel:
    """A debug tower + a debug Conformer speech part."""
    t = tiny.tower(n_layers=2, seed=seed)
    torch.manual_seed(seed)
    part = build_speech_part(t, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"], **kw)
    return ComposedModel(t, speech=part).eval()


@pytest.mark.parametrize("frames", [1, 3, 4, 5, 7, 8, 97, 101])
def test_lengths_exact_for_odd_clip_lengths(frames):
    m = debug_models().speech
    x = torch.randn(1, frames, 80)
    emb = m.encode(x, torch.tensor([frames]))
    enc_len = (frames + 3) // 4
    assert emb[0].shape == (((enc_len - 1) // 2 + 1), 64)
    assert m.output_rows(torch.tensor([frames])).item() == emb[0].shape[0]


def test_batched_equals_unbatched():
    m = debug_models().speech
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 37, 80, generator=g), torch.randn(1, 90, 80, generator=g)
    batch = torch.zeros(2, 90, 80)
    batch[0, :37], batch[1] = a[0], b[0]
    with torch.no_grad():
        both = m.encode(batch, torch.tensor([37, 90]))
        alone = [m.encode(a, torch.tensor([37]))[0], m.encode(b, torch.tensor([90]))[0]]
    for x, y in zip(both, alone):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_rotary_attention_relative_positions():
    """RoPE scores depend only on the distance between positions; identical tokens give identical outputs."""

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
        assert torch.equal(m(text).logits, m.tower(text))
    frames = torch.tensor([50, 23])
    n = m.speech.output_rows(frames).tolist()
    P = m.token_id("speech")
    prompts = [expand_placeholders([1, 7, P, 9], P, [k]) for k in n]
    batch = collate_text([build_example(p, [20, 21, 22]) for p in prompts], pad_id=0)
    feats = torch.randn(2, 50, 80)
    speech = [feats[0, :50], feats[1, :23]]
    assert (batch["labels"][0, : len(prompts[0])] == -100).all()
    m.train()
    out = m(batch["input_ids"], speech_features=speech, labels=batch["labels"])
    assert not m.tower.training
    before = {k: v.clone() for k, v in m.tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    out.loss.backward()
    opt.step()
    assert all(p.grad is None for p in m.tower.parameters())
    assert all(torch.equal(v, m.tower.state_dict()[k]) for k, v in before.items())
    assert m.speech.adapter.proj.weight.grad is not None and m.speech.encoder.input_proj.weight.grad is not None
    with pytest.raises(ValueError, match="sample 0: 2 <.speech.> placeholders but"):
        m(torch.tensor([[1, P, P, 3]]), speech_features=speech[:1])


def test_paper_preset_parameter_counts():
    with torch.device("meta"):
        enc = ConformerEncoder(CONFORMER_PRESETS["paper"])
        ad = SpeechAdapter(enc.out_dim, get_preset("llama3_1_8b").dim, ADAPTER_PRESETS["paper"])
    assert 0.9e9 < count_params(enc) < 1.1e9
    assert 85e6 < count_params(ad) < 115e6


@pytest.mark.parametrize("frames", [1, 2, 3, 7, 50, 51])
def test_frame_stacking_lengths_and_padding(frames):
    """stack=2 (Whisper's 20 ms frames -> 80 ms tokens): exact lengths, and padding never leaks into a clip."""

    torch.manual_seed(0)
    ad = SpeechAdapter(16, 24, dataclasses.replace(ADAPTER_PRESETS["debug"], stack=2)).eval()
    x = torch.randn(1, frames, 16)
    out, n = ad(x, torch.tensor([frames]))
    want = ((frames + 1) // 2 - 1) // 2 + 1
    assert int(n[0]) == want == int(ad.output_lengths(torch.tensor([frames]))[0])
    padded = torch.cat([x, torch.randn(1, 9, 16)], dim=1)
    out2, n2 = ad(padded, torch.tensor([frames]))
    assert int(n2[0]) == want and torch.allclose(out2[0, :want], out[0, :want], atol=1e-5)


# --- cached encoder outputs and the auxiliary CTC loss --------------------------------------------------------


def test_cached_encoder_outputs_equal_live_encoding(tmp_path, smollm_tok):
    """derive_shards copies every sample with its frozen-encoder output; the sample maker trains on the cache only
    when it was written by the configured encoder, and the adapter rows from it equal the live ones (float16
    storage)."""

    recs = [
        {"audio": (f"c{i}.wav", tiny.wav_bytes(0.3 + 0.4 * i, 300 + 100 * i)), "text": f"clip {i}"} for i in range(3)
    ]
    write_shards(recs, tmp_path / "src", progress=False)
    model = debug_models(freeze_encoder=True)
    rep = cache_encoder_outputs(model.speech.encoder, "conformer:debug", tmp_path / "src/index.json", tmp_path / "enc")
    assert rep.written == 3
    samples = read_samples(read_index(tmp_path / "enc/index.json")[0])
    assert [s["txt"] for s in samples] == [f"clip {i}".encode() for i in range(3)]
    waves = [decode_audio(s["wav"], s["__key__"], "wav") for s in samples]
    with torch.no_grad():
        live = encode_speech(model.speech, [log_mel(w) for w in waves], None, "cpu")
        make = speech_samples(model, smollm_tok, "conformer:debug")
        items = [make(s) for s in samples]
        assert all(list(it["speech"][0]) == ["encoded"] for it in items)
        cached = encode_speech(model.speech, None, [it["speech"][0]["encoded"] for it in items], "cpu")
    for it, a, b in zip(items, live, cached):
        assert a.shape == b.shape and it["input_ids"].count(model.token_id("speech")) == a.shape[0]
        assert torch.allclose(a, b, atol=2e-3, rtol=2e-3)
    # another encoder's cache is not used: the clip is encoded live from its audio
    other = speech_samples(model, smollm_tok, "conformer:small")
    assert list(other(samples[0])["speech"][0]) == ["features"]
    # a damaged cache member is a counted bad sample naming the clip
    with pytest.raises(SampleError, match="enc.npy"):
        make({**samples[0], "enc.npy": b"not an array"})


def speech_samples(model, tok, encoder: str) -> Samples:
    """The training sample maker of a frozen-encoder run whose config names `encoder`."""

    class cfg:
        class speech:
            freeze_encoder = True

    cfg.speech.encoder = encoder
    return Samples.of(model, tok, options=SampleOptions(max_text_tokens=16), cfg=cfg)


def test_ctc_auxiliary_loss_trains_rows_towards_the_token_table(tmp_path):
    """The CTC head adds a finite loss in training only, reaches the adapter, learns, and is saved and loaded
    with the adapter (generation never uses it)."""

    model = debug_models(freeze_encoder=True, ctc_weight=0.5)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(40, 80, generator=g), torch.randn(56, 80, generator=g)]
    n = model.speech.output_rows(torch.tensor([40, 56])).tolist()
    sp = model.token_id("speech")
    targets = [[5, 9, 9, 3], [7, 2, 11]]
    ids, labels = [], []
    for k, t in zip(n, targets):
        seq = [1] + [sp] * k + t + [2]
        ids.append(seq + [0] * (20 - len(seq)))
        labels.append([-100] * (1 + k) + t + [2] + [-100] * (20 - len(seq)))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "speech_features": feats}
    model.train()
    out = model(**batch)
    assert out.aux_sum is not None and torch.isfinite(out.aux_sum) and out.aux_sum > 0
    (out.loss_sum + out.aux_sum).backward()
    assert model.speech.adapter.proj.weight.grad.abs().sum() > 0 and model.speech.ctc.blank.grad is not None
    assert all(p.grad is None for p in model.tower.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = float(out.aux_sum.detach())
    for _ in range(30):
        opt.zero_grad()
        model(**batch).aux_sum.backward()
        opt.step()
    assert float(model(**batch).aux_sum.detach()) < 0.5 * first
    model.eval()
    assert model(**batch).aux_sum is None
    save_part(model, "speech", tmp_path / "a.safetensors")
    back = load_composed(model.tower, [tmp_path / "a.safetensors"]).speech
    assert back.ctc is not None and back.ctc.weight == 0.5
    assert torch.equal(back.ctc.blank, model.speech.ctc.blank)


def test_ctc_posterior_inputs_are_mixtures_of_the_towers_own_embeddings(tmp_path):
    """inputs=ctc_posterior (LegoSLM): the tower reads, at each <|speech|> position, the row's CTC posterior over
    its token table weighting its own embeddings (+ a learned blank input); the token loss reaches the adapter
    through the posteriors; the file records the mode, and a CTC-phase file trained with rows starts it."""

    model = debug_models(freeze_encoder=True, ctc_weight=1.0, inputs="ctc_posterior")
    part, table = model.speech, model.tower.tok_embeddings.weight
    rows = torch.randn(6, table.shape[1])
    got = part.tower_inputs(table, rows)
    keys = torch.cat(
        [torch.nn.functional.normalize(table, dim=-1), torch.nn.functional.normalize(part.ctc.blank, dim=-1)[None]]
    )
    p = (part.ctc.log_scale.exp() * torch.nn.functional.normalize(rows, dim=-1) @ keys.T).softmax(-1)
    assert torch.allclose(got, p[:, :-1] @ table + p[:, -1:] * part.blank_input[None], atol=1e-5)
    assert torch.allclose(part.blank_input, table.mean(0))
    # one training step: the token loss reaches the adapter through the posteriors
    feats = [torch.randn(40, 80)]
    n = int(part.output_rows(torch.tensor([40])))
    sp = model.token_id("speech")
    ids = torch.tensor([[1] + [sp] * n + [5, 9, 2]])
    labels = torch.tensor([[-100] * (1 + n) + [5, 9, 2]])
    model.train()
    out = model(input_ids=ids, labels=labels, speech_features=feats)
    out.loss_sum.backward()
    assert part.adapter.proj.weight.grad.abs().sum() > 0 and part.blank_input.grad is not None
    model.eval()
    save_part(model, "speech", tmp_path / "lego.safetensors")
    back = load_composed(model.tower, [tmp_path / "lego.safetensors"]).speech
    assert back.inputs == "ctc_posterior" and torch.equal(back.blank_input, part.blank_input)
    # a rows-trained file (the CTC phase) initialises a ctc_posterior part; its blank input starts fresh
    rows_model = debug_models(freeze_encoder=True, ctc_weight=1.0)
    save_part(rows_model, "speech", tmp_path / "rows.safetensors")
    init_part_from_file(model, "speech", tmp_path / "rows.safetensors")
    assert torch.equal(model.speech.ctc.blank, rows_model.speech.ctc.blank)
    with pytest.raises(ValueError, match="ctc_weight > 0"):
        debug_models(inputs="ctc_posterior")
