"""The modality plug-ins, by name. A new modality = one module under adapters/modalities/ + one line in
adapters/modalities/__init__.py, which registers the built-in ones in order (a test may `register` a toy modality
of its own).

Order matters three times: token id ranges are allocated in registration order; files load in this order (a
part's `requires` come first); where blocks of several modalities sit before one tower layer, later modalities'
blocks run first (a video block before the image block it was copied from, as in the paper's video model).
"""

from __future__ import annotations

from .modality import Modality

MODALITIES: dict[str, Modality] = {}


def register(spec: Modality) -> Modality:
    """Add a plug-in; its token ids follow those of the plug-ins registered before it."""
    if spec.name in MODALITIES:
        raise ValueError(f"a modality named {spec.name!r} is already registered")
    missing = [r for r in spec.requires if r not in MODALITIES]
    if missing:
        raise ValueError(f"{spec.name} requires {missing}: register those first")
    if spec.rows < 1:
        raise ValueError(f"{spec.name}: a modality needs at least one token id (rows >= 1)")
    MODALITIES[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a plug-in (tests); the ids of those after it move down, so do this only with the last one."""
    if name in MODALITIES and list(MODALITIES)[-1] != name:
        raise ValueError(f"only the last registered modality can be removed ({list(MODALITIES)[-1]!r})")
    MODALITIES.pop(name, None)


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


def token_rows() -> dict[str, tuple[int, int]]:
    """Each modality's token ids as (first id - the tower's vocabulary size, count), allocated in order."""
    out, start = {}, 0
    for name, spec in MODALITIES.items():
        out[name] = (start, spec.rows)
        start += spec.rows
    return out


def modality_for_file(name: str) -> Modality | None:
    """The plug-in whose medium's extensions include this file's (None: none does)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return next((m for m in MODALITIES.values() if ext in m.exts), None)


def modality_for_format(fmt: str) -> Modality | None:
    return next((m for m in MODALITIES.values() if m.format == fmt), None)
