"""Mixed runs: several parts trained (or frozen) in one run on one tower, several sources (image captions, speech
transcripts, text-only conversations) mixed sample by sample with a deterministic interleave, exact resume and
per-source counts in metrics.jsonl."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from mm_llama.cli import main as cli_main
from mm_llama.config import ConfigError
from recipes.train import load_train_config
from recipes.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ROOT / "tests/assets/shards"


def run(main, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")

    def chat(n: int) -> dict:
        count = " ".join(map(str, range(1, n + 1)))
        return {"messages": [{"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": count}]}

    (tmp / "chat.jsonl").write_text("".join(json.dumps(chat(n)) + "\n" for n in range(2, 10)))
    argv = ["shards", "write", "--from", "messages", str(tmp / "chat.jsonl"), "--out", str(tmp / "s"), "--quiet"]
    code, _, err = run(cli_main, *argv)
    assert code == 0, err
    return tmp / "s/index.json"


def mixed(run_dir, text_shards, *extra):
    sources = [
        {"train": str(SHARDS / "image/index.json"), "weight": 2},
        {"train": str(SHARDS / "audio/index.json"), "weight": 1},
        {"train": str(text_shards), "weight": 1},
    ]
    return [
        "--config",
        "recipes/configs/debug_image.yaml",
        f"run_dir={run_dir}",
        "model.modalities=[image, speech]",
        "data.train=",
        f"data.sources={json.dumps(sources)}",
        "data.batch_size=4",
        "steps=4",
        "ckpt_every=2",
        "tensorboard=false",
        *extra,
    ]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_parts_three_sources_resume_exactly(tmp_path, text_shards):
    code, out, err = run(train_main, *mixed(tmp_path / "full", text_shards))
    assert code == 0, err
    full = metrics(tmp_path / "full")
    counts = [m["source_samples"] for m in full]
    assert [sum(c) for c in counts] == [4, 8, 12, 16] and all(c > 0 for c in counts[-1])
    for kind in ("image", "speech"):
        with safe_open(str(tmp_path / f"full/adapter-{kind}.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["mm_llama"])["format"].startswith(f"mm_llama.{kind}")
    assert not (tmp_path / "full/adapter.safetensors").exists()
    # stopped after 2 steps and resumed: the same losses and the same per-source counts
    code, _, err = run(train_main, *mixed(tmp_path / "cut", text_shards, "stop_after=2"))
    assert code == 0, err
    code, _, err = run(train_main, *mixed(tmp_path / "cut", text_shards))
    assert code == 0, err
    cut = metrics(tmp_path / "cut")
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    assert [m["source_samples"] for m in cut] == counts


def test_a_frozen_part_from_a_file(tmp_path, text_shards):
    argv = ["--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path / 'img'}", "steps=1"]
    code, _, err = run(train_main, *argv, "tensorboard=false")
    assert code == 0, err
    image = tmp_path / "img/adapter.safetensors"
    argv = mixed(tmp_path / "run", text_shards, f"model.image.init={image}", "model.image.trainable=false", "steps=2")
    code, _, err = run(train_main, *argv)
    assert code == 0, err
    assert (tmp_path / "run/adapter-speech.safetensors").is_file()
    assert not (tmp_path / "run/adapter-image.safetensors").exists()  # frozen: nothing new to save


def test_mixed_config_errors(text_shards):
    image = ROOT / "recipes/configs/debug_image.yaml"
    with pytest.raises(ConfigError, match="data.train .* or data.sources"):
        load_train_config(image, [f"data.sources=[{{train: {text_shards}}}]"])
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_train_config(image, ["data.train=", "data.sources=[{train: x, weight: 0}]"])
    code, _, err = run(train_main, "--config", "recipes/configs/debug_image.yaml", "model.modalities=[image, smell]")
    assert code == 2 and "model.modalities" in err and "smell" in err


def test_preview_shows_each_sources_share(text_shards, tmp_path):
    argv = mixed(tmp_path, text_shards)[:-4]  # the config and sources, without the run's step options
    code, out, err = run(cli_main, "data", "preview", *argv, "--n", "12")
    assert code == 0, err
    assert out.count("--- sample") == 12 and "--- sources of these 12 samples" in out
    lines = out.split("--- sources of these 12 samples\n")[1].splitlines()
    assert len(lines) == 3 and "weight 2 = 50%" in lines[0] and "weight 1 = 25%" in lines[2]
    assert sum(int(line.split(": ")[1].split(" ")[0]) for line in lines) == 12
