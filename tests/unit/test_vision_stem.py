"""The optional convolutional stem of the image encoder (VisionArgs.stem; the demo preset uses one): same token
layout as the plain patch conv, stored in adapter files and rebuilt from them, refused where the Mllama layout
cannot express it; Llama 3.2 Vision's own layout (no stem) is unchanged."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import load_composed, save_part
from mm_llama.adapters.hf_mllama import export_hf_mllama
from mm_llama.adapters.image import build_image_part, get_vision_preset
from mm_llama.adapters.vision import VisionArgs, VisionEncoder
from mm_llama.llama.checkpoint import CheckpointError
from tests import tiny


def _inputs(a: VisionArgs, B: int = 2):
    g = torch.Generator().manual_seed(0)
    px = torch.rand(B, 1, a.max_num_tiles, 3, a.image_size, a.image_size, generator=g)
    mask = torch.zeros(B, 1, a.max_num_tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    return px, torch.ones(B, 1, dtype=torch.long), mask


def test_stem_keeps_the_token_layout():
    demo = get_vision_preset("demo")
    assert demo.stem and not VisionArgs().stem  # the demo has one; Llama 3.2 Vision does not
    torch.manual_seed(0)
    with_stem, plain = VisionEncoder(demo), VisionEncoder(dataclasses.replace(demo, stem=()))
    assert plain.conv_stem is None and plain.patch_embedding.kernel_size == (28, 28)
    assert with_stem.patch_embedding.kernel_size == (28 // 2 ** len(demo.stem),) * 2
    x = _inputs(demo)
    assert with_stem(*x).shape == plain(*x).shape == (2, 1, 1, demo.num_patches, demo.output_dim)
    with pytest.raises(ValueError, match="not divisible"):
        VisionArgs(patch_size=14, stem=(8, 8))
    with pytest.raises(ValueError, match="stem_depth 3"):
        VisionArgs(stem=(8,), stem_depth=3)


def test_stem_is_saved_and_rebuilt(tmp_path):
    torch.manual_seed(0)
    tower = tiny.tower(n_layers=2)
    vargs = dataclasses.replace(get_vision_preset("debug"), stem=(4,), stem_depth=2)
    model = ComposedModel(tower, image=build_image_part(tower, vargs)).eval()
    assert [m.stride for m in model.image.vision_encoder.conv_stem if hasattr(m, "stride")] == [(1, 1), (2, 2)]
    path = tmp_path / "a.safetensors"
    save_part(model, "image", path)
    again = load_composed(tower, [path]).image
    assert again.vision_args.stem == (4,) and again.vision_args.stem_depth == 2
    sd, sd2 = model.image.vision_encoder.state_dict(), again.vision_encoder.state_dict()
    assert any(k.startswith("conv_stem.") for k in sd) and sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(CheckpointError, match="convolutional stem"):
        export_hf_mllama(model, tmp_path / "hf")


def test_adapter_files_without_a_stem_entry_load_plain(tmp_path):
    tower = tiny.tower(n_layers=2)
    path, old = tmp_path / "a.safetensors", tmp_path / "old.safetensors"
    save_part(ComposedModel(tower, image=build_image_part(tower, "debug")), "image", path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["mm_llama"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["vision"].pop("stem")  # written before the stem existed
    meta["vision"].pop("stem_depth")
    save_file(state, str(old), metadata={"mm_llama": json.dumps(meta)})
    args = load_composed(tower, [old]).image.vision_args
    assert args.stem == () and args.stem_depth == 1
