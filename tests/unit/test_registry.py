"""Every registered modality plug-in works through the generic paths alone: build, sample maker (picklable, no
model inside), collate, the composed forward with labels, save/load of its adapter file, an answer to a file."""

import pickle
from pathlib import Path

import pytest
import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.describe import describe
from mm_llama.adapters.files import adapter_kind, load_composed, save_part
from mm_llama.adapters.modalities.image import image_batch
from mm_llama.adapters.registry import MODALITIES, get_modality, modality_for_file, token_rows
from mm_llama.config import load_config
from mm_llama.data.image import decode_image
from mm_llama.data.shards import expand_urls, read_samples
from mm_llama.engine.parallelize import param_groups
from mm_llama.engine.step import warmup_cosine
from recipes.train import TrainConfig, build_model, build_tower, collate_for, samples_for

ROOT = Path(__file__).resolve().parents[2]
SHARDS = {"image": "image", "video": "video", "speech": "audio"}


def built(kind):
    cfg = load_config(TrainConfig, ROOT / f"recipes/configs/debug_{kind}.yaml")
    torch.manual_seed(0)
    return cfg, build_model(cfg, build_tower(cfg))


def test_registry_lists_complete_plugins():
    assert list(MODALITIES) == ["image", "video", "speech"]
    assert token_rows() == {"image": (0, 8), "video": (8, 1), "speech": (9, 1)}
    for name, spec in MODALITIES.items():
        assert spec.name == name and spec.format and spec.exts and spec.part.inputs
        assert spec.scale.plan_pieces is not None and spec.scale.shard_units is not None
    assert modality_for_file("a/b.JPG").name == "image" and modality_for_file("x.mp4").name == "video"
    assert modality_for_file("talk.flac").name == "speech" and modality_for_file("notes.txt") is None
    with pytest.raises(KeyError, match="unknown modality 'smell'"):
        get_modality("smell")


@pytest.mark.parametrize("kind", list(MODALITIES))
def test_plugin_through_the_generic_paths(kind, smollm_tok, tmp_path):
    cfg, model = built(kind)
    spec = get_modality(kind)
    assert isinstance(model, ComposedModel) and kind in model.modalities
    maker = samples_for(cfg, smollm_tok, model)
    blob = pickle.dumps(maker)  # DataLoader workers receive it: no model inside
    assert (
        len(blob) < 10 * 2**20
        and b"ComposedModel" not in blob
        and not any(p in blob for p in (b"ImagePart", b"VideoPart", b"SpeechPart"))
    )
    raw = read_samples(expand_urls(str(ROOT / f"tests/assets/shards/{SHARDS[kind]}/index.json")), 2)
    batch = collate_for(cfg)([maker(s) for s in raw])
    assert set(batch) == {"input_ids", "labels"} | (set(batch) & set(spec.part.inputs))
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.n_tokens == int((batch["labels"][:, 1:] != -100).sum())
    out.loss.backward()
    assert any(p.grad is not None for p in model.part(kind).parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.tower.parameters())
    files = []
    for k in model.kinds:  # a video adapter travels with its image adapter
        save_part(model, k, tmp_path / f"{k}.safetensors")
        files.append(tmp_path / f"{k}.safetensors")
    assert adapter_kind(files[-1]) == kind
    back = load_composed(model.tower, files)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, model(**batch).logits)
    ext = next(e for e in spec.exts if e in raw[0])
    answer = describe(back, smollm_tok, f"clip.{ext}", raw[0][ext], max_new_tokens=3)
    assert answer.kind == kind and isinstance(answer.text, str)


def test_training_tiles_images_as_inference_does(smollm_tok):
    """The debug encoder takes up to 4 tiles: the sample maker tiles as inference does (one function)."""
    cfg, model = built("image")
    assert model.image.vision_args.max_num_tiles == 4
    raw = read_samples(expand_urls(str(ROOT / "tests/assets/shards/image/index.json")), 3)
    batch = collate_for(cfg)([samples_for(cfg, smollm_tok, model)(s) for s in raw])
    ref = image_batch(model, [[decode_image(s[next(e for e in ("png", "jpg", "jpeg") if e in s)])] for s in raw])
    for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(batch[k], ref[k]), k


def test_encoder_lr_scale_groups():
    """optim.encoder_lr_scale: the trained vision encoder in its own AdamW group at that fraction of the rate, through
    warm-up and decay; every trainable parameter in exactly one group; 1.0 keeps the single group of before."""

    cfg = load_config(TrainConfig, ROOT / "recipes/configs/debug_image.yaml", ["optim.encoder_lr_scale=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg, build_tower(cfg))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    enc = {id(p) for n, p in model.named_parameters() if p.requires_grad and "vision_encoder" in n.split(".")}
    assert enc and enc < trainable  # debug_image trains its encoder (freeze_vision false)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.encoder_lr_scale)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)
    assert [g["lr"] for g in groups] == [3.0e-3, pytest.approx(3.0e-4)]
    assert {id(p) for p in groups[1]["params"]} == enc
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, cfg.steps))
    for _ in range(3):
        opt.step()
        sched.step()
        a, b = sched.get_last_lr()
        assert b == pytest.approx(0.1 * a)
    one = load_config(TrainConfig, ROOT / "recipes/configs/debug_image.yaml")
    assert len(param_groups(model, one.optim.lr, one.optim.encoder_lr_scale)) == 1
