"""Audio of any length gets an answer: too short is a clear error naming the file (CLI exit 2), long clips are
transcribed in pieces, damaged files are errors naming the file."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.describe import describe
from mm_llama.adapters.files import load_composed, save_part
from mm_llama.adapters.modalities.speech import CHUNK_SECONDS, MIN_SECONDS
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.registry import MODALITIES
from mm_llama.adapters.samples import plain_requests
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.cli import main
from mm_llama.data.audio import speech_pieces
from mm_llama.data.badsamples import SampleError


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    n = int(seconds * rate)
    sf.write(buf, (0.3 * torch.sin(torch.arange(n) * 0.05)).numpy(), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(smollm):
    torch.manual_seed(0)
    speech = build_speech_part(smollm, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"])
    return ComposedModel(smollm, speech=speech).eval()


@pytest.mark.parametrize("seconds", [0.0005, 0.005, 0.02, MIN_SECONDS / 2])
def test_too_short_is_a_named_error(model, smollm_tok, seconds):
    with pytest.raises(SampleError, match=r"tiny\.wav: .* too short \(at least 0\.1 s\)"):
        describe(model, smollm_tok, "tiny.wav", wav_bytes(seconds), max_new_tokens=2)


def test_cut_wav_is_a_named_error(model, smollm_tok):
    data = wav_bytes(1.0)[:60]  # the header says one second; a few samples remain
    with pytest.raises(SampleError, match="cut.wav"):
        describe(model, smollm_tok, "cut.wav", data, max_new_tokens=2)


def test_just_long_enough_and_long_clips_answer(model, smollm_tok):
    assert describe(model, smollm_tok, "short.wav", wav_bytes(MIN_SECONDS), max_new_tokens=2).media_seconds == 0.1
    long = describe(model, smollm_tok, "long.wav", wav_bytes(2 * CHUNK_SECONDS + 5), max_new_tokens=2)
    assert long.kind == "speech" and long.media_seconds == 2 * CHUNK_SECONDS + 5


def utterances(n: int, seed: int = 0):
    """A recording of `n` voiced bursts (1-3 s, amplitude-modulated tones + noise) with 0.2-0.6 s pauses between
    them and a 5 s silent tail: (waveform, the bursts' sample ranges)."""
    g = np.random.default_rng(seed)
    parts, bursts, t = [], [], 0
    for _ in range(n):
        s = int(g.uniform(1, 3) * 16000)
        tt = np.arange(s) / 16000
        tone = 0.3 * np.sin(2 * np.pi * g.uniform(150, 400) * tt) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * tt))
        parts.append(tone + 0.01 * g.standard_normal(s))
        bursts.append((t, t + s))
        gap = int(g.uniform(0.2, 0.6) * 16000)
        parts.append(0.003 * g.standard_normal(gap))
        t += s + gap
    parts.append(0.003 * g.standard_normal(5 * 16000))
    return torch.tensor(np.concatenate(parts), dtype=torch.float32), bursts


@pytest.mark.parametrize("max_seconds", [8.0, 30.0])
def test_long_recordings_are_cut_in_pauses(max_seconds):
    wave, bursts = utterances(30)
    pieces = speech_pieces(wave, max_seconds)
    assert (
        all(b - a <= max_seconds * 16000 for a, b in pieces) and len(pieces) >= wave.numel() / 16000 / max_seconds - 1
    )
    cuts = [b for _, b in pieces[:-1]]
    assert not any(s < c < e for c in cuts for s, e in bursts)  # never inside an utterance
    assert all(any(a <= s and e <= b for a, b in pieces) for s, e in bursts)  # every utterance whole in a piece
    # about one utterance per piece (a gap under min_pause joins two), shaped like a training clip: each piece
    # starts within a few frames of an utterance
    assert len(pieces) >= 0.75 * len(bursts)
    assert all(any(0 <= s - a <= 0.05 * 16000 for s, _ in bursts) for a, _ in pieces)
    assert pieces[-1][1] < wave.numel() - 4 * 16000  # the silent tail is left out


def test_a_short_clip_is_trimmed_to_the_trained_shape():
    """A clip shorter than a piece is one piece, cut to its voice like the pieces of a long recording: 0.3 s of
    leading silence alone took the demo adapter's WER from 4.5% to 33%, and a flite clip starts with 0.2 s."""
    g = np.random.default_rng(0)
    speech = 0.3 * np.sin(np.arange(16000) * 0.05) * (1 + 0.1 * g.standard_normal(16000))
    quiet = 0.002 * g.standard_normal(8000)
    wave = torch.tensor(np.concatenate([quiet, speech, quiet]), dtype=torch.float32)
    [(a, b)] = speech_pieces(wave, 8.0)
    assert 8000 - 0.05 * 16000 <= a <= 8000 and 24000 <= b <= 24000 + 0.35 * 16000
    assert speech_pieces(torch.zeros(16000), 8.0) == [] and speech_pieces(torch.zeros(0), 8.0) == []
    steady = torch.tensor(speech, dtype=torch.float32)  # no pause at all: kept whole
    assert speech_pieces(steady, 8.0) == [(0, 16000)]


def test_a_recording_without_pauses_is_still_cut():
    wave = torch.randn(40 * 16000) * 0.1
    pieces = speech_pieces(wave, 10.0)
    assert all(b - a <= 10 * 16000 for a, b in pieces) and pieces[0][0] == 0 and pieces[-1][1] == wave.numel()
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


def test_cli_short_clip_exit_2(model, smollm_path, tmp_path, capsys):
    save_part(model, "speech", tmp_path / "speech.safetensors")
    (tmp_path / "tiny.wav").write_bytes(wav_bytes(0.01))
    args = ["asr", "--model", str(smollm_path), "--adapter", str(tmp_path / "speech.safetensors")]
    code = main([*args, str(tmp_path / "tiny.wav")])
    err = capsys.readouterr().err
    assert code == 2 and "tiny.wav" in err and "too short" in err and "Traceback" not in err


def test_a_long_recording_is_answered_in_its_pieces(smollm, smollm_tok, tmp_path):
    """An adapter trained on short clips (piece_seconds 8, recorded in its file) answers a long recording in
    pieces cut in its pauses: one request per piece, each at most 8 s."""
    torch.manual_seed(0)
    part = build_speech_part(
        smollm, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"], piece_seconds=8.0
    )
    save_part(ComposedModel(smollm, speech=part), "speech", tmp_path / "speech.safetensors")
    model = load_composed(smollm, [tmp_path / "speech.safetensors"])
    assert model.speech.piece_seconds == 8.0
    wave, _ = utterances(20)
    buf = io.BytesIO()
    sf.write(buf, wave.numpy(), 16000, format="WAV")
    requests = MODALITIES["speech"].inference.requests
    items, seconds = requests(model, smollm_tok, buf.getvalue(), "long.wav", "wav", AnswerOptions())
    assert len(items) == len(speech_pieces(wave, 8.0)) > 5 and abs(seconds - wave.numel() / 16000) < 1e-3
    longest = max(len(it["input_ids"]) for it in items)
    nine = plain_requests(model, smollm_tok, "speech", [wave[: 9 * 16000]], "x", AnswerOptions())[0]
    assert longest < len(nine["input_ids"])  # every piece shorter than 9 s of audio
