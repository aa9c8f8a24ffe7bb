"""The modality plug-ins, by name. A new modality = one module under adapters/modalities/ + one line here.

Order matters twice: files load in this order (a part's `requires` come first), and where blocks of several
modalities sit before one tower layer, later modalities' blocks run first (a video block before the image block
it was copied from, as in the paper's video model).
"""

from __future__ import annotations

from .modalities import image, speech, video
from .modality import Modality

MODALITIES: dict[str, Modality] = {
    "image": image.SPEC,
    "video": video.SPEC,
    "speech": speech.SPEC,
}


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


def modality_for_file(name: str) -> Modality | None:
    """The plug-in whose media extensions include this file's (None: none does)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return next((m for m in MODALITIES.values() if ext in m.exts), None)


def modality_for_format(fmt: str) -> Modality | None:
    return next((m for m in MODALITIES.values() if m.format == fmt), None)
