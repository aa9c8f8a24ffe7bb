"""One entry for the command line and the web page: a media file -> its caption or transcript, with whichever of
the composed model's adapters handles the file's kind (images and videos get captions, audio gets transcripts)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from mm_llama.data.audio import AUDIO_EXTS
from mm_llama.data.image import IMAGE_EXTS
from mm_llama.data.video import VIDEO_EXTS

from .composed import ComposedModel

MEDIA_KINDS = {"image": IMAGE_EXTS, "video": VIDEO_EXTS, "speech": AUDIO_EXTS}
WHAT = {"image": "caption", "video": "video caption", "speech": "transcript"}


class Answer(NamedTuple):
    kind: str  # image | video | speech
    text: str
    media_seconds: float | None = None  # audio: the clip's length (for a real-time factor)


class UnsupportedMedia(ValueError):
    """A file no loaded adapter handles (unknown extension, or its kind's adapter is not loaded)."""


def media_kind(name: str) -> str | None:
    ext = Path(name).suffix.lower().lstrip(".")
    return next((kind for kind, exts in MEDIA_KINDS.items() if ext in exts), None)


def check_handled(model: ComposedModel, name: str) -> str:
    """The adapter kind for this file, or UnsupportedMedia saying what is missing."""
    kind = media_kind(name)
    if kind is None:
        known = ", ".join(f"{k}: {' '.join(sorted(v))}" for k, v in MEDIA_KINDS.items())
        raise UnsupportedMedia(f"{name}: unknown file type (known extensions -- {known})")
    if kind not in model.modalities:
        loaded = ", ".join(model.modalities) or "none"
        raise UnsupportedMedia(f"{name}: a {kind} file needs a {kind} adapter (--adapter FILE); loaded: {loaded}")
    return kind


def describe(
    model: ComposedModel,
    tok,
    name: str,
    data: bytes,
    *,
    prompt: str = "",
    frames: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    language: str = "English",
    on_token=None,
) -> Answer:
    """(kind, text, audio seconds) for one file: the same calls a single-adapter model makes, on the composed
    model's parts. Bad media raise data.badsamples.SampleError naming the file."""
    kind = check_handled(model, name)
    seconds = None
    if kind == "image":
        from mm_llama.data.image import decode_image

        from .inference import caption

        (text,) = caption(model.image, tok, [decode_image(data, name)], prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, on_token=on_token)  # fmt: skip
    elif kind == "video":
        from mm_llama.data.image import normalize_tiles
        from mm_llama.data.video import decode_video

        from .inference import caption_video

        size = model.image.vision_encoder.args.image_size
        clip = normalize_tiles(decode_video(data, name, num_frames=frames, size=size))
        text = caption_video(model.video, tok, clip, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             on_token=on_token)  # fmt: skip
    else:
        from mm_llama.data.audio import decode_audio

        from .asr import transcribe

        wave = decode_audio(data, name, Path(name).suffix.lower().lstrip("."))
        seconds = wave.numel() / 16000
        (text,) = transcribe(model.speech, tok, [wave], language=language, max_new_tokens=max_new_tokens,
                             temperature=temperature, on_token=on_token)  # fmt: skip
    return Answer(kind, text.strip(), seconds)
