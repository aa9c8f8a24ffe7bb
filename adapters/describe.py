"""One entry for the command line and the web page: a media file -> its caption or transcript, answered by the
plug-in whose medium the file is (adapters/registry.py), through the composed model's one forward."""

from __future__ import annotations

from typing import NamedTuple

from .composed import ComposedModel
from .generation import answer_file
from .modality import AnswerOptions
from .registry import MODALITIES, modality_for_file


class Answer(NamedTuple):
    kind: str  # the modality that answered
    text: str
    media_seconds: float | None = None  # audio: the clip's length (for a real-time factor)


class UnsupportedMedia(ValueError):
    """A file no loaded adapter handles (unknown extension, or its kind's adapter is not loaded)."""


def check_handled(model: ComposedModel, name: str) -> str:
    """The modality for this file, or UnsupportedMedia saying what is missing."""
    return handled_kind(name, model.modalities)


def handled_kind(name: str, kinds, have: str = "loaded") -> str:
    """The modality for this file if it is among `kinds` (the adapters `have`: loaded, or given before loading),
    else UnsupportedMedia saying what is missing."""
    spec = modality_for_file(name)
    if spec is None:
        known = ", ".join(f"{m.name}: {' '.join(sorted(m.exts))}" for m in MODALITIES.values())
        raise UnsupportedMedia(f"{name}: unknown file type (known extensions -- {known})")
    if spec.name not in kinds:
        listed = ", ".join(kinds) or "none"
        raise UnsupportedMedia(
            f"{name}: a {spec.name} file needs a {spec.name} adapter (--adapter FILE); {have}: {listed}"
        )
    return spec.name


def describe(model: ComposedModel, tok, name: str, data: bytes, **options) -> Answer:
    """(kind, text, audio seconds) for one file; options: AnswerOptions fields (prompt, frames, max_new_tokens,
    temperature, top_p, seed, language, on_token). Bad media raise data.badsamples.SampleError naming the file."""
    kind = check_handled(model, name)
    text, seconds = answer_file(model, tok, kind, data, name, AnswerOptions(**options))
    return Answer(kind, text.strip(), seconds)
