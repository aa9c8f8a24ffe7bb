"""The catalogue of shipped training configs: package data (`mm_llama/recipes/configs/*.yaml` in a wheel,
`recipes/configs/` in a checkout), found by name or path, listed and copied.

    mm-llama configs                       each shipped config with its one-line description
    mm-llama configs copy NAME DEST        a copy to edit (never over an existing file)
    mm-llama train --config NAME|PATH      NAME: a shipped config (debug_image, demo/speech, ...)
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from mm_llama.config import ConfigError

CONFIGS = Path(__file__).resolve().parent / "configs"  # beside this module: a checkout's and an installed wheel's


def shipped() -> dict[str, Path]:
    """name (relative path without .yaml, e.g. `debug_image`, `demo/speech`) -> file, sorted."""
    return {str(p.relative_to(CONFIGS).with_suffix("")): p for p in sorted(CONFIGS.rglob("*.yaml"))}


def describe(path: Path) -> str:
    """A config's description: its leading comment lines, joined (the first sentence-ish line is enough)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def find_config(name_or_path: str | Path) -> Path:
    """A config file by path (an existing file wins) or by shipped name; a ConfigError lists the close names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = shipped()
    key = str(name_or_path).removesuffix(".yaml").removeprefix("recipes/configs/")
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=4, cutoff=0.5)
    hint = f"; close: {', '.join(close)}" if close else f"; shipped: {', '.join(names)}"
    raise ConfigError(f"{name_or_path}: no such config file or shipped config{hint} (mm-llama configs lists them)")


def copy(name: str, dest: str | Path) -> Path:
    """A shipped config copied to `dest` (a file, or a folder to put NAME.yaml in); an existing file is kept."""
    src = find_config(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise ConfigError(f"{dest}: already exists (nothing was overwritten); choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest
