"""Named sizes -> modules: image encoder presets and cross-attention placements (paper / released / CPU demo)."""

from __future__ import annotations

from mm_llama.llama.config import ModelArgs
from mm_llama.llama.model import Transformer

from .fusion import FusedVisionModel, default_schedule, init_extra_rows
from .vision import VisionArgs

VISION_PRESETS: dict[str, VisionArgs] = {
    # Llama 3.2 Vision 11B and 90B share this encoder: ViT-H/14, 32 + 8 gated global layers, 448 px tiles
    "llama3_2_vision": VisionArgs(),
    # CPU demo size: a small ViT for 28-224 px images (one 56 px tile of 2x2 patches: one token per 28 px
    # Fashion-MNIST cell), with a four-conv stem (two stages of stride 1 + stride 2: 28 px cell -> 7x7 map -> one
    # token): 91.9 / 92.1 / 91.1% of held-out items for seeds 0-2 after 3,000 steps at batch 32 (bf16, label smoothing
    # 0.1; without it 91.2 / 91.2 / 90.7%), where one stride-2 conv per stage reaches 89.9-90.8% and the plain 28 px
    # patch projection 88% (benchmarks/demo_encoder.py)
    "demo": VisionArgs(
        image_size=56,
        patch_size=28,
        stem=(32, 64),
        stem_depth=2,
        width=128,
        layers=4,
        heads=4,
        mlp_dim=512,
        global_layers=1,
        intermediate_layers=(1, 3),
        max_num_tiles=1,
    ),  # fmt: skip
    "debug": VisionArgs(
        image_size=28,
        patch_size=14,
        width=32,
        layers=3,
        heads=4,
        mlp_dim=64,
        global_layers=1,
        intermediate_layers=(1,),
        max_num_tiles=4,
    ),  # fmt: skip
}


def get_vision_preset(name: str) -> VisionArgs:
    try:
        return VISION_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown vision preset {name!r}; known: {', '.join(sorted(VISION_PRESETS))}") from None


def xattn_schedule(tower: ModelArgs, every: int = 4, n_xattn: int | None = None) -> list[int]:
    """The paper's placement: a cross-attention block before every `every`-th tower layer (8B: 8, 70B: 20,
    405B: 31 blocks), counted from the top as the released code does."""
    return default_schedule(tower.n_layers, every, n_xattn)


def attach_image_adapter(
    tower: Transformer, vision: str | VisionArgs = "demo", every: int = 4, n_xattn: int | None = None, **kw
):
    """A fresh image adapter (gates at 0) on any plain Llama 3 tower; the tower is frozen."""
    vargs = get_vision_preset(vision) if isinstance(vision, str) else vision
    model = FusedVisionModel(tower, vargs, xattn_schedule(tower.args, every, n_xattn), **kw)
    init_extra_rows(model.learnable_embedding, tower)
    return model
