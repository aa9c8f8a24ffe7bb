"""Packing is a layout change only (the contract): a packed run's logged losses equal the padded run's, rel <= 1e-5
in fp32, for image, video and speech, on 2 ranks for 3 steps."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mm_llama.config import ConfigError
from mm_llama.data.badsamples import SampleError
from mm_llama.data.shards import expand_urls, read_samples
from recipes.train import build_model, build_tower, load_train_config, samples_for
from tests.ddp_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# max_tokens fits several of the committed samples in one row (image ~20 tokens, video ~15, speech ~60)
CASES = {
    "image": ["data.max_tokens=80"],
    "video": ["data.max_tokens=64"],
    "speech": ["data.max_tokens=200", "model.speech.ctc_weight=0.3"],  # the CTC loss split per packed sample too
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_packed_losses_equal_padded(tmp_path, kind):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "tests.packing_pair", "--out", str(tmp_path), "--config", f"recipes/configs/debug_{kind}.yaml"]
    cmd += ["steps=3", "ckpt_every=3", "data.batch_size=4", "data.shuffle_buffer=1", "tensorboard=false", *CASES[kind]]
    env = {"OMP_NUM_THREADS": "1", "MM_LLAMA_PG_TIMEOUT": "120"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-4000:]
    pair = json.loads(re.findall(r"PAIR (.*)", r.stdout)[-1])
    assert len(pair["padded"]) == len(pair["packed"]) == 3
    for a, b in zip(pair["padded"], pair["packed"]):
        assert abs(a - b) <= 1e-5 * abs(a), pair


def test_too_long_samples_are_counted_skips_and_bad_limits_config_errors(smollm_tok):
    image = ROOT / "recipes/configs/debug_image.yaml"
    cfg = load_train_config(image, ["data.max_tokens=64", "data.max_text_tokens=8"])
    model = build_model(cfg, build_tower(cfg))
    raw = read_samples(expand_urls(str(ROOT / "tests/assets/shards/image/index.json")), 1)[0]
    assert len(samples_for(cfg, smollm_tok, model)(raw)["input_ids"]) <= 64
    short = load_train_config(
        ROOT / "recipes/configs/debug_image.yaml", ["data.max_tokens=3", "data.max_text_tokens=2"]
    )
    with pytest.raises(SampleError, match=rf"{raw['__key__']}: \d+ tokens > data.max_tokens 3"):
        samples_for(short, smollm_tok, model)(raw)
    with pytest.raises(ConfigError, match="data.pack: true needs data.max_tokens"):
        load_train_config(image, ["data.pack=true"])
    with pytest.raises(ConfigError, match="data.max_tokens 16 is below data.max_text_tokens 64"):
        load_train_config(image, ["data.max_tokens=16"])
