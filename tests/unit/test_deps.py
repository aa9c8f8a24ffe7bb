"""The committed lock is what is installed, and a mismatched torch triple gives one clear error."""

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from mm_llama import deps

ROOT = Path(__file__).resolve().parents[2]
LOCKS = [ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "assets.lock.txt"]


def _pins(path: Path) -> dict[str, str]:
    """name -> version for the lock lines whose environment marker fits this interpreter."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, _, marker = line.partition(";")
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", req.strip())
        assert m, f"{path.name}: not an exact pin: {line!r}"
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def test_installed_packages_match_the_lock():
    pins = {}
    for lock in LOCKS:
        pins.update(_pins(lock))
    # the packages the project imports are all pinned
    for name in ("torch", "torchvision", "torchaudio", "einops", "accelerate", "webdataset", "safetensors", "numpy"):
        assert name in pins, f"{name} is not in the lock"
    wrong = {}
    for name, version in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (have, version)
    assert not wrong, f"installed != lock (installed, locked): {wrong}; run `make install`"


def test_lock_pins_a_matched_torch_triple():
    pins = _pins(LOCKS[0])
    versions = {n: pins[n] for n in ("torch", "torchaudio", "torchvision")}
    assert deps.triple_problems(versions) == []


def test_triple_rules():
    assert deps.matched_versions("2.11.0+cpu") == {"torchaudio": "2.11.0", "torchvision": "0.26.0"}
    assert deps.triple_problems({"torch": "2.11.0", "torchaudio": "2.11.0", "torchvision": "0.26.0"}) == []
    # the drift that broke a fresh install: torchaudio 2.11.1 beside torch 2.11.0
    (problem,) = deps.triple_problems({"torch": "2.11.0", "torchaudio": "2.11.1", "torchvision": "0.26.0"})
    assert "torchaudio 2.11.1" in problem and "needs torchaudio 2.11.0" in problem
    (problem,) = deps.triple_problems({"torch": "2.12.0", "torchaudio": None, "torchvision": "0.26.0"})
    assert "torchvision 0.26.0" in problem and "0.27.0" in problem


def test_mismatch_is_one_clear_error(monkeypatch):
    fake = {"torch": "2.11.0", "torchaudio": "2.11.1", "torchvision": "0.26.0"}
    monkeypatch.setattr(deps, "_installed", fake.get)
    with pytest.raises(deps.DependencyError, match=r"torchaudio 2\.11\.1 is installed.*pip install -c"):
        deps.import_torchaudio()
    fake["torchaudio"] = None
    with pytest.raises(deps.DependencyError, match="not installed"):
        deps.import_torchaudio()


def test_failing_import_is_wrapped(monkeypatch):
    def broken(name):
        raise OSError("libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace")

    monkeypatch.setattr(deps.importlib, "import_module", broken)
    with pytest.raises(deps.DependencyError, match="does not load beside torch.*undefined symbol"):
        deps.import_torchaudio()


def test_audio_features_use_the_checked_import():
    torchaudio = deps.import_torchaudio()
    assert metadata.version("torchaudio").startswith(torchaudio.__version__.split("+")[0])
