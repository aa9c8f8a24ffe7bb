"""Damaged or odd checkpoint folders: every loader error names the file and what is wrong (no raw library
tracebacks), and a Meta folder of a tied-embedding tower loads tied."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_llama.llama import Transformer, get_preset, load_pretrained, save_meta
from mm_llama.llama.checkpoint import CheckpointError
from tests import tiny
from tests.parity.test_llama_hf import make_hf


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf("gqa2_tied").save_pretrained(folder, safe_serialization=True)
    return folder


def copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_safetensors_named(hf_folder, tmp_path, damage):
    folder = copy(hf_folder, tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x00garbage" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(folder)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, not 0"),
        ("hidden_size", "64", "hidden_size must be a positive integer, not '64'"),
        ("num_key_value_heads", 3, "not a multiple of 3 key/value heads"),
        ("vocab_size", None, "missing required key 'vocab_size'"),
        ("num_hidden_layers", True, "num_hidden_layers must be a positive integer"),
    ],
)
def test_bad_config_values_named(hf_folder, tmp_path, key, value, message):
    folder = copy(hf_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    if value is None:
        cfg.pop(key)
    else:
        cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_pretrained(folder)
    assert message in str(e.value)


@pytest.mark.parametrize("damage", ["not_json", "a_list"])
def test_unreadable_config_named(hf_folder, tmp_path, damage):
    folder = copy(hf_folder, tmp_path / "m")
    (folder / "config.json").write_text({"not_json": "{oops", "a_list": "[1, 2]"}[damage])
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(folder)


def test_meta_folder_of_a_tied_tower_loads_tied(tmp_path, capfd):
    """Llama 3.2 1B/3B Meta checkpoints have no output.weight and params.json does not say the embeddings are
    tied: the loader ties them and says so."""
    args = get_preset("debug").replace(tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_meta(model, tmp_path)
    shard = tmp_path / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    sd.pop("output.weight", None)
    torch.save(sd, shard)
    params = json.loads((tmp_path / "params.json").read_text())
    params.pop("tie_embeddings", None)
    (tmp_path / "params.json").write_text(json.dumps(params))
    back = load_pretrained(tmp_path)
    assert "tied to tok_embeddings" in capfd.readouterr().err
    assert back.output.weight is back.tok_embeddings.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(back(ids), model.eval()(ids))


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_damaged_meta_shard_named(tmp_path, damage):
    save_meta(tiny.tower(n_layers=2), tmp_path)
    shard = tmp_path / "consolidated.00.pth"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:  # a pickle of something that is not a tensor: weights_only refuses it
        shard.write_bytes(pickle.dumps({"x": Path("/etc/passwd")}))
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_pretrained(tmp_path)


def test_cli_names_the_file_without_a_traceback(hf_folder, tmp_path):
    folder = copy(hf_folder, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"garbage")
    mm = str(Path(sys.executable).parent / "mm-llama")
    r = subprocess.run(
        [mm, "generate", "--model", str(folder), "--prompt", "x"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr
