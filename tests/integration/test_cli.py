"""The `mm-llama` command: the console script itself as a user runs it (a subprocess), and its subcommands through
`mm_llama.cli.main` in this process (the same code, without a Python + torch start per call)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from mm_llama.cli import main
from mm_llama.data.shards import read_index, read_samples
from tests import tiny

MM = [str(Path(sys.executable).parent / "mm-llama")]


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(MM + list(args), capture_output=True, text=True, timeout=300, env=env)


def cli(capsys, *args) -> SimpleNamespace:
    """`mm-llama ARGS` in this process: (returncode, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_generate_streams_completion(smollm_path):
    r = run("generate", "--model", str(smollm_path), "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_generate_int8_weight_only(smollm_path, capsys):
    r = cli(
        capsys,
        "generate",
        "--model",
        str(smollm_path),
        "--dtype",
        "bf16",
        "--quantize",
        "int8",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_chat_sampling(smollm_path, capsys):
    r = cli(
        capsys,
        "generate",
        "--model",
        str(smollm_path),
        "--chat",
        "--prompt",
        "Say hi.",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--max-new-tokens",
        "5",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("> Say hi.")


def test_generate_bad_model_path(tmp_path, capsys):
    r = cli(capsys, "generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "missing" in r.stderr


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "demo" in r.stdout


def test_caption_cli_with_adapter(tmp_path, smollm_path, smollm, capsys):
    """A fresh image adapter on the real SmolLM2 tower, saved and used through `mm-llama caption`."""
    files = tiny.adapter_files(smollm, tmp_path, ["image"], gates=0.0)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "img.png")
    r = cli(
        capsys,
        "caption",
        "--model",
        str(smollm_path),
        "--adapter",
        str(files["image"]),
        str(tmp_path / "img.png"),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr
    # gates start at 0: the untrained adapter leaves the tower's own answer intact
    assert r.stdout.startswith(str(tmp_path / "img.png") + ":") and "Paris" in r.stdout
    bad = cli(capsys, "caption", "--model", str(smollm_path), "--adapter", str(files["image"]), str(tmp_path / "x.mp4"))
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_shards_encode_caches_the_frozen_encoder(tmp_path):
    """`mm-llama shards encode`: the speech shards copied with each clip's Whisper encoder output."""

    index = Path(__file__).resolve().parents[1] / "assets/shards/audio/index.json"
    r = run("shards", "encode", str(index), "--encoder", "whisper:asset:whisper_tiny_en_ct2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    samples = read_samples(read_index(tmp_path / "index.json")[0])
    assert out["written"] == len(samples) == sum(read_index(index)[1])
    assert all(s["enc.txt"] == b"whisper:asset:whisper_tiny_en_ct2" for s in samples)
    assert all(s["enc.npy"][:6] == b"\x93NUMPY" for s in samples)
