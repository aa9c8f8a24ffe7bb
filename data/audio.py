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


# The shape of the clips a speech adapter is trained on (the demo's TTS clips: speech starts within ~15 ms and
# ends ~0.3 s before the clip does). Pieces of a long recording are cut to that shape: measured on the demo's
# adapter, 0.3 s more of leading silence alone took its WER on held-out clips from 4.5% to 33%
# (benchmarks/long_audio.py reports the long-recording figure).
LEAD_MARGIN_S, TRAIL_MARGIN_S = 0.01, 0.3


def speech_pieces(
    wave: torch.Tensor,
    max_seconds: float,
    *,
    min_pause: float = 0.25,
    min_seconds: float = 0.1,
    target_seconds: float = 1.5,
) -> list[tuple[int, int]]:
    """Where to cut a recording of any length for a model trained on clips of at most `max_seconds`: [start, end)
    sample ranges, each at most that long, cut in pauses (voice activity from 30 ms frame energies: a frame is
    quiet below the recording's noise floor + a third of its range, at least 6 dB); pieces that hold no voiced
    frame are left out. A piece ends at the first pause of at least `min_pause` once it is `target_seconds` long
    (one utterance per piece, as the adapter was trained on); a stretch with no pause within `max_seconds` is cut
    at the last pause inside it, else at its quietest frame in the window's second half. Each piece is then
    trimmed to its voiced frames with `LEAD_MARGIN_S` before and `TRAIL_MARGIN_S` after."""
    n, frame = wave.numel(), 480  # 30 ms frames, 10 ms hop
    limit = int(max_seconds * SAMPLE_RATE)
    if n <= limit:
        return [(0, n)] if n else []
    x = torch.nn.functional.pad(wave.float(), (0, max(0, frame - n)))
    db = 10 * torch.log10(x.unfold(0, frame, HOP).pow(2).mean(1) + 1e-10)  # frame f covers [f*HOP, f*HOP + frame)
    floor, top = torch.quantile(db, 0.1).item(), torch.quantile(db, 0.95).item()
    if top - floor >= 10.0:
        quiet = db < floor + max(6.0, (top - floor) / 3)
    else:  # no contrast between loud and quiet parts: all of it is sound (or all silence, below -50 dBFS)
        quiet = torch.full_like(db, top < -50.0, dtype=torch.bool)
    pause_at = _pause_centres(quiet, int(min_pause * SAMPLE_RATE / HOP))  # frame index -> centre sample
    pieces, start = [], 0
    target = int(target_seconds * SAMPLE_RATE)
    while n - start > 0:
        first = next((c for c in pause_at if start + target <= c < n), None)
        if first is not None and first - start <= limit:
            cut = first
        elif n - start <= limit:
            cut = n
        else:
            lo, hi = start + int(min_seconds * SAMPLE_RATE), start + limit
            inside = [c for c in pause_at if lo < c <= hi]
            if inside:
                cut = inside[-1]
            else:  # no pause: the quietest frame of the window's second half
                f0, f1 = (start + limit // 2) // HOP, max((hi - frame) // HOP, (start + limit // 2) // HOP + 1)
                cut = (f0 + int(db[f0:f1].argmin())) * HOP + frame // 2
        pieces.append((start, cut))
        start = cut
    pieces = [_trim(quiet, a, b, n) for a, b in pieces if _voiced(quiet, a, b)]
    return [(a, b) for a, b in pieces if b - a >= min_seconds * SAMPLE_RATE]


def _pause_centres(quiet: torch.Tensor, min_frames: int) -> list[int]:
    """The centre sample of every run of at least `min_frames` quiet frames."""
    out, run = [], 0
    q = quiet.tolist()
    for f, is_quiet in enumerate([*q, False]):
        if is_quiet:
            run += 1
            continue
        if run >= max(min_frames, 1):
            out.append(((f - run + f) // 2) * HOP + 240)
        run = 0
    return out


def _trim(quiet: torch.Tensor, a: int, b: int, n: int) -> tuple[int, int]:
    """A piece cut to its voiced frames, with `LEAD_MARGIN_S` of what precedes and `TRAIL_MARGIN_S` of what
    follows (within the piece)."""
    voiced = (~quiet[a // HOP : max(a // HOP + 1, b // HOP)]).nonzero().squeeze(-1)
    first, last = (a // HOP + int(voiced[0])) * HOP, (a // HOP + int(voiced[-1])) * HOP + 480
    lead, trail = int(LEAD_MARGIN_S * SAMPLE_RATE), int(TRAIL_MARGIN_S * SAMPLE_RATE)
    return max(a, first - lead), min(b, last + trail, n)


def _voiced(quiet: torch.Tensor, a: int, b: int) -> bool:
    return bool((~quiet[a // HOP : max(a // HOP + 1, b // HOP)]).any())
