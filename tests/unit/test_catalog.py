"""The shipped configs: found by name from anywhere, listed with their descriptions, copied (never over a file),
a wrong name answered with the close ones; one `mm-llama` for training, evaluation and the plan."""

import contextlib
import io
from pathlib import Path

import pytest

from mm_llama.assets import resolve
from mm_llama.cli import main
from mm_llama.config import ConfigError
from recipes.catalog import copy, find_config, shipped
from recipes.train import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_names_paths_and_close_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere, not the checkout
    assert find_config("debug_image") == ROOT / "recipes/configs/debug_image.yaml"
    assert find_config("demo/speech").name == "speech.yaml" and "demo/tiny" in shipped()
    assert find_config("recipes/configs/debug_video.yaml").name == "debug_video.yaml"  # the old spelling
    with pytest.raises(ConfigError, match="debug_imgae: no such config .* close: debug_image"):
        find_config("debug_imgae")
    cfg = load_train_config("gpu_llama3_2_90b_vision_image")
    assert Path(resolve(cfg.tower.path), "config.json").is_file()  # config:hf/... ships beside the configs


def test_configs_list_and_copy(tmp_path, capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(shipped()) and "debug_image" in out and "CPU, seconds" in out
    assert main(["configs", "copy", "debug_speech", str(tmp_path)]) == 0
    assert (tmp_path / "debug_speech.yaml").read_text() == find_config("debug_speech").read_text()
    assert main(["configs", "copy", "debug_speech", str(tmp_path)]) == 2  # already there: kept
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        copy("nope", tmp_path)


def test_train_and_evaluate_through_mm_llama(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    argv = ["train", "--config", "debug_image", f"run_dir={tmp_path}", "steps=1", "tensorboard=false"]
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0, err.getvalue()
        assert main(["train", "--config", "debug_imgae"]) == 2
    assert (tmp_path / "adapter.safetensors").is_file() and "LOSSES" in out.getvalue()
    assert "mm-llama train: config error: debug_imgae" in err.getvalue() and "debug_image" in err.getvalue()
