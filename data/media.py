"""The media kinds samples may hold, by name: the shard writer, reader and verifier and the manifest reader loop
over this table and special-case none of them. A new medium is one `register_medium(Medium(...))` (a modality
plug-in does it in its own module).

A medium has a name (the manifest field and the decoded key: "image", "video", "audio"), the member extensions it
is stored under, and a decoder `decode(data, name, ext, **options) -> value` that raises `SampleError` naming the
sample for bad bytes. `check` is what writing and verifying run on every sample (default: `decode`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .audio import AUDIO_EXTS, decode_audio
from .image import IMAGE_EXTS, decode_image
from .video import VIDEO_EXTS, decode_video


@dataclass(frozen=True)
class Medium:
    name: str
    exts: tuple[str, ...]
    decode: Callable[..., Any]  # (data, name, ext, **options) -> the decoded medium
    check: Callable[..., Any] | None = None  # (data, name, ext) -> anything; raises SampleError (default: decode)

    def verify(self, data: bytes, name: str, ext: str) -> None:
        (self.check or self.decode)(data, name, ext)


MEDIA: dict[str, Medium] = {}


def register_medium(medium: Medium) -> Medium:
    if medium.name in MEDIA and MEDIA[medium.name] != medium:
        raise ValueError(f"a different medium named {medium.name!r} is already registered")
    MEDIA[medium.name] = medium
    return medium


def unregister_medium(name: str) -> None:
    MEDIA.pop(name, None)


def medium_for_ext(ext: str) -> Medium | None:
    """The first registered medium stored under this extension (None: none)."""
    ext = ext.lower()
    return next((m for m in MEDIA.values() if ext in m.exts), None)


def _image(data: bytes, name: str, ext: str = "png"):
    return decode_image(data, name)


def _video(data: bytes, name: str, ext: str = "mp4", **options):
    return decode_video(data, name, **options)


def _video_check(data: bytes, name: str, ext: str = "mp4"):
    return decode_video(data, name, num_frames=1)


IMAGE = register_medium(Medium("image", IMAGE_EXTS, _image))
VIDEO = register_medium(Medium("video", VIDEO_EXTS, _video, check=_video_check))
AUDIO = register_medium(Medium("audio", AUDIO_EXTS, decode_audio))
