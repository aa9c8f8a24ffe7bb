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
    if n == 0:
        return []
    db = _frame_db(wave, frame)
    quiet = _quiet_frames(db)
    if n <= limit:  # one piece, trimmed to its voice like the pieces of a long recording
        span = _voice_span(quiet, n)
        return [span] if span else []
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


def trim_to_voice(wave: torch.Tensor) -> torch.Tensor:
    """A clip cut to the shape of a training clip (`speech_pieces`' one piece): `LEAD_MARGIN_S` before its first
    voiced frame, `TRAIL_MARGIN_S` after its last; a clip with no quiet stretch, or no voice, is kept whole. Every
    clip a speech adapter reads passes here once (training, cached encoder outputs, chat audio, `asr`)."""
    span = _voice_span(_quiet_frames(_frame_db(wave)), wave.numel()) if wave.numel() else None
    return wave[span[0] : span[1]] if span else wave


def _voice_span(quiet: torch.Tensor, n: int) -> tuple[int, int] | None:
    """[start, end) of a whole clip of n samples trimmed to its voice (`_trim`); None when nothing is voiced."""
    return _trim(quiet, 0, n, n) if _voiced(quiet, 0, n) else None


def _frame_db(wave: torch.Tensor, frame: int = 480) -> torch.Tensor:
    """Energy (dB) of 30 ms frames at a 10 ms hop: frame f covers samples [f*HOP, f*HOP + frame)."""
    x = torch.nn.functional.pad(wave.float(), (0, max(0, frame - wave.numel())))
    return 10 * torch.log10(x.unfold(0, frame, HOP).pow(2).mean(1) + 1e-10)


def _quiet_frames(db: torch.Tensor) -> torch.Tensor:
    """Voice activity from frame energies: quiet below the recording's noise floor + a third of its range (at
    least 6 dB)."""
    floor, top = torch.quantile(db, 0.1).item(), torch.quantile(db, 0.95).item()
    if top - floor >= 10.0:
        return db < floor + max(6.0, (top - floor) / 3)
    # no contrast between loud and quiet parts: all of it is sound (or all silence, below -50 dBFS)
    return torch.full_like(db, top < -50.0, dtype=torch.bool)


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


# --- augmentation (for training corpora written to shards) ------------------------------------------------------
def augment_speech(wave: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """A 16 kHz clip as another recording of it might sound: speed (tempo and pitch together, x0.9-1.1),
    sometimes a telephone band (through 8 kHz), a room (a synthetic reverberation tail, RT60 0.15-0.6 s), noise
    (white or low-passed, 10-30 dB SNR) and a level (peak 0.2-0.9). -> (clip, what was done). Deterministic for
    a given `rng` state; meant for clips written to training shards (their frozen-encoder outputs can be cached)."""
    F = import_torchaudio("speech augmentation").functional
    x, done = wave.float(), {}
    speed = round(float(rng.uniform(0.9, 1.1)) * SAMPLE_RATE / 200) * 200 / SAMPLE_RATE  # small resampling kernels
    x = F.resample(x, int(round(SAMPLE_RATE * speed)), SAMPLE_RATE)
    done["speed"] = round(speed, 3)
    if rng.random() < 0.3:
        x = F.resample(F.resample(x, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)
        done["band"] = "8k"
    if rng.random() < 0.5:
        rt60 = float(rng.uniform(0.15, 0.6))
        t = torch.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        rir = torch.from_numpy(rng.standard_normal(t.numel())).float() * torch.exp(-6.9 * t / rt60)
        rir[0] = 0.0
        rir = rir / rir.norm() * float(rng.uniform(0.3, 1.0))  # reverberant energy vs the direct path
        rir[0] = 1.0
        x = F.fftconvolve(x, rir)[: x.numel() + int(0.2 * SAMPLE_RATE)]
        done["rt60"] = round(rt60, 2)
    if rng.random() < 0.7:
        noise = torch.from_numpy(rng.standard_normal(x.numel())).float()
        if rng.random() < 0.5:  # low-passed ("brown-ish") noise: a hum rather than a hiss
            noise = F.lowpass_biquad(noise, SAMPLE_RATE, float(rng.uniform(200, 2000)))
        snr = float(rng.uniform(10, 30))
        p_sig, p_noise = x.pow(2).mean().clamp(min=1e-10), noise.pow(2).mean().clamp(min=1e-10)
        x = x + noise * torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10)))
        done["snr_db"] = round(snr, 1)
    peak = float(rng.uniform(0.2, 0.9))
    x = x / x.abs().max().clamp(min=1e-6) * peak
    done["peak"] = round(peak, 2)
    return x, done


def wav_bytes(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono float clip in [-1, 1] -> 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    sf.write(buf, wave.clamp(-1, 1).numpy(), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
