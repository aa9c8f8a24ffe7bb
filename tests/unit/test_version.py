"""The version: `mm-llama --version`, the CHANGELOG's newest entry, adapter files that say which version reads them."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import mm_llama
from mm_llama.adapters.files import load_composed, read_adapter_meta
from mm_llama.cli import main
from mm_llama.llama import CheckpointError
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]


def test_version_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mm-llama {mm_llama.__version__}"
    assert f"## {mm_llama.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    assert f'version = "{mm_llama.__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_a_file_that_needs_a_newer_version_says_so(tiny_tower, tmp_path):
    path = tiny.adapter_files(tiny_tower, tmp_path, kinds=("image",))["image"]
    meta = read_adapter_meta(path)
    assert meta["version"] == mm_llama.__version__ and meta["requires"] == "0.1.0"
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(str(path)), str(newer), metadata={"mm_llama": json.dumps({**meta, "requires": "99.1.0"})})
    with pytest.raises(CheckpointError, match=r"newer.safetensors: .* needs mm_llama >= 99.1.0; this is .*upgrade"):
        load_composed(tiny_tower, [newer])
    old = tmp_path / "old.safetensors"  # written before `requires` existed: loads
    save_file(
        load_file(str(path)),
        str(old),
        metadata={"mm_llama": json.dumps({k: v for k, v in meta.items() if k != "requires"})},
    )
    assert load_composed(tiny_tower, [old]).modalities == ["image"]
