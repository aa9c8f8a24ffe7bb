"""Checks on the installed torch / torchvision / torchaudio triple.

torchvision and torchaudio wheels are compiled against one torch release, and pip does not know it: torchaudio
2.11.1 installs beside torch 2.11.0 and then fails at import with `undefined symbol: ...` from libtorchaudio.so.
The releases move together: torch 2.M.P goes with torchaudio 2.M.P and torchvision 0.(M+15).P.
`import_torchaudio()` checks the versions from the installed metadata (nothing is imported for the check) and
turns a mismatch, or a failing import, into one `DependencyError` that says what is installed, what is needed
and how to fix it.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from types import ModuleType

FIX = (
    "install the matched releases, e.g. `pip install -c requirements/lock.txt torch torchvision torchaudio` "
    "from a checkout of mm-llama, or `make install` for the project's own .venv"
)


class DependencyError(ImportError):
    """An installed package does not fit the rest (a torch / torchaudio / torchvision mismatch)."""


def _release(version: str) -> tuple[int, int, int] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def matched_versions(torch_version: str) -> dict[str, str]:
    """The torchaudio / torchvision releases built for a torch release (local tags such as +cpu dropped)."""
    r = _release(torch_version)
    if r is None:
        return {}
    major, minor, patch = r
    return {"torchaudio": f"{major}.{minor}.{patch}", "torchvision": f"0.{minor + 15}.{patch}"}


def triple_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """Mismatches between torch and the installed torchaudio / torchvision; empty when they fit."""
    if versions is None:
        versions = {n: _installed(n) for n in ("torch", "torchaudio", "torchvision")}
    torch_version = versions.get("torch")
    if torch_version is None:
        return ["torch is not installed"]
    need = matched_versions(torch_version)
    problems = []
    for name, want in need.items():
        have = versions.get(name)
        if have is not None and _release(have) != _release(want):
            problems.append(f"{name} {have} is installed, but torch {torch_version} needs {name} {want}")
    return problems


def import_torchaudio(what: str = "audio features") -> ModuleType:
    """`import torchaudio`, or one DependencyError naming the versions and the fix."""
    versions = {n: _installed(n) for n in ("torch", "torchaudio", "torchvision")}
    if versions["torchaudio"] is None:
        raise DependencyError(f"mm-llama needs torchaudio for {what}, and it is not installed: {FIX}")
    problems = triple_problems(versions)
    if problems:
        raise DependencyError(f"mismatched PyTorch packages ({'; '.join(problems)}): {FIX}")
    try:
        return importlib.import_module("torchaudio")
    except (ImportError, OSError) as e:
        raise DependencyError(
            f"torchaudio {versions['torchaudio']} does not load beside torch {versions['torch']} "
            f"({type(e).__name__}: {str(e)[:200]}): {FIX}"
        ) from None
