"""Config values are checked for range and choice when the config loads: a clear error naming the key and what is
allowed, before anything is written to the run folder."""

from pathlib import Path

import pytest

from mm_llama.config import ConfigError, _coerce, load_config
from recipes.demo import DemoConfig
from recipes.demo.config import stage_config
from recipes.demo.speech_open import TABLE as OPEN_TABLE
from recipes.demo.stages import STAGE_TABLE
from recipes.train import TrainConfig, load_train_config, main

CFG = "recipes/configs/debug_image.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.grad_accum=0", "optim.grad_accum: 0 is out of range; it must be >= 1"),
        ("ckpt_every=0", "ckpt_every: 0 is out of range"),
        ("data.batch_size=0", "data.batch_size: 0 is out of range"),
        ("data.max_bad_fraction=1.5", "must be in [0.0, 1.0]"),
        ("optim.lr=-1", "optim.lr: -1"),
        ("dtype=fp16", "dtype: 'fp16' is not allowed; choose one of auto, float32, bfloat16"),
        ("engine=horovod", "engine: 'horovod' is not allowed"),
        ("data.split=random", "data.split: 'random' is not allowed"),
        ("model.modality=smell", "model.modality: 'smell' is not allowed; choose one of image, video, speech"),
        ("model.image.vision=huge", "model.image.vision: 'huge' is not allowed"),
        ("model.video.query_init=zeros", "model.video.query_init: 'zeros' is not allowed"),
        ("model.speech.encoder=lstm", "model.speech.encoder: 'lstm' is not allowed"),
        ("model.speech.adapter=huge", "model.speech.adapter: 'huge' is not allowed"),
        ("steps=many", "steps: expected int"),
        ("bucket_cap_mb=big", "bucket_cap_mb: 'big' is not allowed; give a number or auto"),
        ("bucket_cap_mb=-1", "bucket_cap_mb: -1.0 is out of range"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, CFG, [override])
    assert message in str(e.value)


def test_every_default_is_valid():
    load_config(TrainConfig)


def test_nothing_is_written_before_the_check(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", CFG, f"run_dir={run}", "optim.grad_accum=0"]) == 2
    assert "optim.grad_accum" in capsys.readouterr().err and not run.exists()
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err


def test_exponent_floats_without_a_dot():
    """YAML 1.1 (PyYAML) reads `3e-3` as a string; a float field takes it as the number a user means."""

    assert _coerce("3e-3", float, "optim.lr") == 0.003 and _coerce("1E+2", float, "x") == 100.0
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        _coerce("3e", float, "optim.lr")


def test_bucket_cap_is_auto_or_a_number():
    assert load_config(TrainConfig).bucket_cap_mb == "auto"
    assert load_config(TrainConfig, CFG, ["bucket_cap_mb=5"]).bucket_cap_mb == 5.0


ROOT = Path(__file__).resolve().parents[2]
DEMO_RUN_CONFIGS = ("tiny.yaml", "speech_open.yaml")  # DemoConfig files; the other demo/*.yaml train one stage
TRAINING_CONFIGS = sorted((ROOT / "recipes/configs").glob("*.yaml")) + [
    p for p in sorted((ROOT / "recipes/configs/demo").glob("*.yaml")) if p.name not in DEMO_RUN_CONFIGS
]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.relative_to(ROOT / "recipes/configs").as_posix())
def test_every_shipped_training_config_loads(path):
    assert load_train_config(path).steps > 0


@pytest.mark.parametrize(
    "path", [None, *(ROOT / "recipes/configs/demo" / n for n in DEMO_RUN_CONFIGS)], ids=["defaults", *DEMO_RUN_CONFIGS]
)
def test_demo_configs_override_only_training_stages_and_their_keys(path):
    cfg = load_config(DemoConfig, path)
    training = {s.name for s in [*STAGE_TABLE, *OPEN_TABLE] if s.training}
    assert set(cfg.stages) <= training and cfg.nproc >= 1
    for name in training:  # every stage's config, with the overrides this demo config gives it, loads
        assert load_train_config(stage_config(name), cfg.stages.get(name, [])).steps > 0
