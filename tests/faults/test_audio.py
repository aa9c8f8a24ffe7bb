"""Audio of any length gets an answer: too short is a clear error naming the file (CLI exit 2), long clips are
transcribed in pieces, damaged files are errors naming the file."""

import io

import pytest
import soundfile as sf
import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.describe import describe
from mm_llama.adapters.files import save_part
from mm_llama.adapters.modalities.speech import CHUNK_SECONDS, MIN_SECONDS, chunks
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.cli import main
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


def test_chunks_cover_the_clip():
    for seconds in (0.5, 30.0, 30.05, 61.0):
        wave = torch.arange(int(seconds * 16000), dtype=torch.float32)
        parts = chunks(wave)
        assert torch.equal(torch.cat(parts), wave)
        assert all(p.numel() <= (CHUNK_SECONDS + MIN_SECONDS) * 16000 for p in parts)
        assert all(p.numel() >= MIN_SECONDS * 16000 for p in parts) or len(parts) == 1


def test_cli_short_clip_exit_2(model, smollm_path, tmp_path, capsys):
    save_part(model, "speech", tmp_path / "speech.safetensors")
    (tmp_path / "tiny.wav").write_bytes(wav_bytes(0.01))
    args = ["asr", "--model", str(smollm_path), "--adapter", str(tmp_path / "speech.safetensors")]
    code = main([*args, str(tmp_path / "tiny.wav")])
    err = capsys.readouterr().err
    assert code == 2 and "tiny.wav" in err and "too short" in err and "Traceback" not in err
