"""The image part (Llama 3.2 Vision's adapter): a ViT encoder, a projection to the tower width, gated cross-attention
blocks that run before chosen tower layers, and 8 learnable token rows (`<|image|>` and 7 reserved).

The part holds only its own weights. `schedule[k]` is the tower layer that block k runs BEFORE (n_layers: after the
last layer); the default is the released placement, every `every`-th layer counted from the top (8B, 32 layers,
every 4: before layers 3, 7, ..., 31). The composed model (adapters/composed.py) calls `encode`, `media_kv` and
`blocks`; the tower is never touched.

Shape legend: B batch, T tokens, I images, N tiles, P tokens per tile, S media tokens (I*N*P), D tower width.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.llama.config import ModelArgs

from .vision import VisionArgs, VisionEncoder
from .xattn import GatedCrossAttentionBlock, media_attention_mask

NUM_EXTRA_TOKENS = 8  # Llama 3.2 Vision's learnable rows after the vocabulary: <|image|> and 7 reserved

VISION_PRESETS: dict[str, VisionArgs] = {
    # Llama 3.2 Vision 11B and 90B share this encoder: ViT-H/14, 32 + 8 gated global layers, 448 px tiles
    "llama3_2_vision": VisionArgs(),
    # CPU demo size: a small ViT for 28-224 px images (one 56 px tile of 2x2 patches: one token per 28 px
    # Fashion-MNIST cell) with a four-conv stem (two stages of stride 1 + stride 2: 28 px cell -> 7x7 map -> one
    # token); docs/demo.md has what it measured against the plain patch projection
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
    ),
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
    ),
}


def get_vision_preset(name: str) -> VisionArgs:
    try:
        return VISION_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown vision preset {name!r}; known: {', '.join(sorted(VISION_PRESETS))}") from None


def default_schedule(n_layers: int, every: int = 4, n_xattn: int | None = None) -> list[int]:
    """Tower layers that get a cross-attention block before them, counted from the top as the released code does
    (by default one every `every` layers; towers shorter than `every` still get one)."""
    n_xattn = n_xattn if n_xattn is not None else max(1, n_layers // every)
    return list(range(n_layers))[::-1][::every][:n_xattn][::-1]


@torch.no_grad()
def init_token_rows(rows: nn.Embedding, table: torch.Tensor) -> None:
    """New token rows start at the scale of the frozen token table (nothing to do on the meta device)."""
    if rows.weight.is_meta or table.is_meta:
        return
    rows.weight.normal_(0.0, float(table.float().std()))


class ImagePart(nn.Module):
    def __init__(
        self,
        tower_args: ModelArgs,
        vision_args: VisionArgs,
        schedule: list[int] | None = None,
        *,
        hf_compat_masking: bool = False,
    ):
        super().__init__()
        a = tower_args
        self.schedule = list(schedule if schedule is not None else default_schedule(a.n_layers))
        if sorted(self.schedule) != self.schedule or not all(0 <= s <= a.n_layers for s in self.schedule):
            raise ValueError(
                f"schedule must be non-decreasing tower layer indices in [0, {a.n_layers}]: {self.schedule}"
            )
        self.tower_args = tower_args  # the shape it was built for (checked when a file loads onto a tower)
        self.vision_encoder = VisionEncoder(vision_args)
        self.vision_projection = nn.Linear(vision_args.output_dim, a.dim, bias=True)
        self.cross_attention_layers = nn.ModuleList(GatedCrossAttentionBlock.for_tower(a) for _ in self.schedule)
        self.learnable_embedding = nn.Embedding(NUM_EXTRA_TOKENS, a.dim)
        # transformers' Mllama lets text rows that see no image attend uniformly (transformers #39379); parity only
        self.hf_compat_masking = hf_compat_masking

    @property
    def vision_args(self) -> VisionArgs:
        return self.vision_encoder.args

    def encode(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """Pixels [B, I, N, C, H, W] -> media tokens [B, I*N*P, D] (projected to the tower width)."""
        feats = self.vision_encoder(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.vision_projection(feats).reshape(feats.shape[0], -1, self.vision_projection.out_features)

    def media_kv(self, media_BSD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block keys/values of the media tokens (generation computes them once per request)."""
        return [blk.media_kv(media_BSD) for blk in self.cross_attention_layers]

    def masks(self, cross_attention_mask_BTIN: torch.Tensor, dtype: torch.dtype):
        """transformers' cross_attention_mask [B, T, I, N] -> (additive bias [B, 1, T, S], row mask [B, T, 1])."""
        return media_attention_mask(cross_attention_mask_BTIN, self.vision_args.num_patches, dtype)

    def blocks(self, kv: list, bias_B1TS: torch.Tensor, row_BT1: torch.Tensor) -> dict[int, list]:
        """{tower layer: [h -> h]}: the cross-attention blocks for the tower's `inject=`. kv[k]: block k's keys and
        values (`media_kv`), or the media tokens themselves (each block then computes its own in its forward, so a
        block sharded by FSDP2 has its weights gathered for them)."""
        out: dict[int, list] = {}
        for k, layer in enumerate(self.schedule):
            blk, kv_k = self.cross_attention_layers[k], kv[k]
            out.setdefault(layer, []).append(
                lambda h, blk=blk, kv_k=kv_k: blk(h, kv_k, bias_B1TS, row_BT1, hf_compat=self.hf_compat_masking)
            )
        return out


def build_image_part(
    tower, vision: str | VisionArgs = "demo", every: int = 4, n_xattn: int | None = None, **kw
) -> ImagePart:
    """A fresh image part (gates at 0: the composed model equals the tower) for a plain Llama 3 tower."""
    vargs = get_vision_preset(vision) if isinstance(vision, str) else vision
    part = ImagePart(tower.args, vargs, default_schedule(tower.args.n_layers, every, n_xattn), **kw)
    init_token_rows(part.learnable_embedding, tower.tok_embeddings.weight)
    return part
