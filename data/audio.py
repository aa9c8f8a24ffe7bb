"""Audio decoding and features: any format, rate, channel count and bit depth -> 16 kHz mono float32 -> log-mel.

soundfile (libsndfile) reads wav/flac/ogg; PyAV (FFmpeg) reads mp3/m4a/opus/aac/webm and anything else.
"""

from __future__ import annotations

import io
from functools import lru_cache

import av
import numpy as np
import soundfile as sf
import torch

from mm_llama.deps import import_torchaudio

from .badsamples import SampleError

AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "webm")
SOUNDFILE_EXTS = ("wav", "flac", "ogg")
SAMPLE_RATE = 16000
N_MELS = 80
WIN = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wav.T, sr  # [channels, samples]


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError("no audio frames")
    return np.concatenate(chunks, axis=1), SAMPLE_RATE


def decode_audio(
    data: bytes,
    name: str = "audio",
    ext: str | None = None,
    *,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """Bytes -> mono float32 waveform [samples] at 16 kHz in [-1, 1]."""
    ext = (ext or "").lower()
    try:
        if ext in SOUNDFILE_EXTS:
            try:
                wav, sr = _decode_soundfile(data)
            except Exception:
                wav, sr = _decode_av(data)  # e.g. an ogg/opus file libsndfile cannot read
        else:
            wav, sr = _decode_av(data)
    except Exception as e:
        raise SampleError("decode_audio", f"{name}: cannot decode audio ({type(e).__name__}: {e})") from None
    x = torch.from_numpy(np.ascontiguousarray(wav)).float().mean(0)
    if sr != SAMPLE_RATE:
        with torch.no_grad():
            x = _resampler(int(sr))(x)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise SampleError("decode_audio", f"{name}: empty or non-finite audio")
    seconds = x.numel() / SAMPLE_RATE
    if seconds < min_seconds:
        raise SampleError("audio_duration", f"{name}: {seconds:.3f} s of audio is too short (at least {min_seconds} s)")
    if max_seconds is not None and seconds > max_seconds:
        raise SampleError("audio_duration", f"{name}: {seconds:.1f} s of audio is too long (at most {max_seconds} s)")
    return x


@lru_cache(maxsize=16)
def _resampler(orig_sr: int):
    """Cached resampler: the windowed-sinc kernel is built once per source rate."""
    torchaudio = import_torchaudio("resampling audio")
    return torchaudio.transforms.Resample(orig_sr, SAMPLE_RATE)


@lru_cache(maxsize=4)
def _mel(n_mels: int):
    torchaudio = import_torchaudio("log-mel features")
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=WIN, win_length=WIN, hop_length=HOP, n_mels=n_mels, power=2.0
    )


def log_mel(wave: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """80-dim log-mel, 25 ms window / 10 ms hop: [samples] -> [frames, n_mels] with frames = samples // 160 + 1."""
    with torch.no_grad():
        spec = _mel(n_mels)(wave.float())
    return spec.clamp(min=1e-10).log().transpose(0, 1).contiguous()


def num_frames(num_samples: int) -> int:
    return num_samples // HOP + 1
