"""The fused image model: a frozen Llama 3 tower + image encoder + gated cross-attention layers.

The tower is used as is (its checkpoint keys never change): the cross-attention blocks live in their own
ModuleList and `schedule[k]` is the tower layer that block k runs BEFORE (n_layers: after the last layer).
The default schedule is the released one: `every`-th layer counted from the top (8B, 32 layers, every 4:
before layers 3, 7, ..., 31). Token ids at or above the tower's vocabulary (`<|image|>` = 128256 and 7 more)
read extra learnable embedding rows kept beside the frozen table.

Shape legend: B batch, T tokens, I images, N tiles, P tokens per tile, D tower width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.llama.model import Transformer

from .vision import VisionArgs, VisionEncoder
from .xattn import GatedCrossAttentionBlock, media_attention_mask

NUM_EXTRA_TOKENS = 8
# Each modality's token ids when adapters are composed on one tower (adapters/composed.py): kind -> (first id - V,
# number of ids, row of the adapter's table that the first id reads). Saved in every adapter file.
TOKEN_ROWS: dict[str, tuple[int, int, int]] = {"image": (0, 8, 0), "video": (8, 1, 1), "speech": (9, 1, 0)}


def embed_with_extra_rows(tower: Transformer, extra_rows: nn.Embedding, ids_BT: torch.Tensor) -> torch.Tensor:
    """Token embeddings where ids >= the tower's vocabulary read learnable rows kept beside the frozen table."""
    V = tower.args.vocab_size
    extra = ids_BT >= V
    h = tower.tok_embeddings(ids_BT.clamp(max=V - 1))
    if extra.any():
        h = torch.where(extra[..., None], extra_rows((ids_BT - V).clamp(min=0)).to(h.dtype), h)
    return h


@torch.no_grad()
def init_extra_rows(extra_rows: nn.Embedding, tower: Transformer) -> None:
    """New token rows start at the scale of the frozen table (nothing to do on the meta device: the memory plan)."""
    if extra_rows.weight.is_meta:
        return
    extra_rows.weight.normal_(0.0, float(tower.tok_embeddings.weight.float().std()))


def default_schedule(n_layers: int, every: int = 4, n_xattn: int | None = None) -> list[int]:
    """Tower layers that get a cross-attention block before them, counted from the top as the released code does
    (by default one every `every` layers; towers shorter than `every` still get one)."""
    n_xattn = n_xattn if n_xattn is not None else max(1, n_layers // every)
    return list(range(n_layers))[::-1][::every][:n_xattn][::-1]


class FusedVisionModel(nn.Module):
    def __init__(
        self,
        tower: Transformer,
        vision_args: VisionArgs,
        schedule: list[int] | None = None,
        *,
        image_token_id: int | None = None,
        hf_compat_masking: bool = False,
    ):
        super().__init__()
        a = tower.args
        self.tower = tower
        self.schedule = list(schedule if schedule is not None else default_schedule(a.n_layers))
        if sorted(self.schedule) != self.schedule or not all(0 <= s <= a.n_layers for s in self.schedule):
            raise ValueError(
                f"schedule must be non-decreasing tower layer indices in [0, {a.n_layers}]: {self.schedule}"
            )
        self.vision_encoder = VisionEncoder(vision_args)
        self.vision_projection = nn.Linear(vision_args.output_dim, a.dim, bias=True)
        self.cross_attention_layers = nn.ModuleList(GatedCrossAttentionBlock.for_tower(a) for _ in self.schedule)
        self.learnable_embedding = nn.Embedding(NUM_EXTRA_TOKENS, a.dim)
        self.image_token_id = image_token_id if image_token_id is not None else a.vocab_size
        self.hf_compat_masking = hf_compat_masking
        self.freeze_tower()

    # generation (mm_llama.generate) sizes its KV cache from these
    @property
    def args(self):
        return self.tower.args

    @property
    def tok_embeddings(self):
        return self.tower.tok_embeddings

    # --- frozen means frozen -----------------------------------------------------------------
    def freeze_tower(self) -> None:
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # the frozen tower stays in eval mode whatever the adapter does
        return self

    def trainable_parameters_table(self) -> str:
        rows = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                top = name.split(".")[0]
                rows[top] = rows.get(top, 0) + p.numel()
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        lines = [f"{'module':<28}{'trainable params':>18}"]
        lines += [f"{k:<28}{v:>18,}" for k, v in rows.items()]
        lines.append(f"{'total trainable':<28}{sum(rows.values()):>18,}")
        lines.append(f"{'frozen (tower)':<28}{frozen:>18,}")
        return "\n".join(lines)

    # --- pieces --------------------------------------------------------------------------------
    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return embed_with_extra_rows(self.tower, self.learnable_embedding, input_ids_BT)

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """-> media tokens [B, I*N*P, D] (projected to the tower width)."""
        feats = self.vision_encoder(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        B = feats.shape[0]
        return self.vision_projection(feats).reshape(B, -1, self.tower.args.dim)

    def media_kv(self, media_BSD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer keys/values for the media tokens (computed once per request)."""
        return [layer.media_kv(media_BSD) for layer in self.cross_attention_layers]

    def blocks(self, media_kv, bias_B1TS, row_BT1) -> dict[int, list]:
        """{tower layer: [h -> h]}: the cross-attention blocks for these media, for the tower's `inject=`."""
        out: dict[int, list] = {}
        for k, layer in enumerate(self.schedule):
            blk, kv = self.cross_attention_layers[k], media_kv[k]
            out.setdefault(layer, []).append(
                lambda h, blk=blk, kv=kv: blk(h, kv, bias_B1TS, row_BT1, hf_compat=self.hf_compat_masking)
            )
        return out

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        *,
        media: torch.Tensor | None = None,
        media_kv: list | None = None,
        media_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
        extra_blocks: dict | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; argument meanings as transformers' MllamaForConditionalGeneration.forward.

        media: projected media tokens [B, S, D] from `encode_images` (K/V recomputed from them on this call).
        media_kv: precomputed `self.media_kv(...)` (generation reuses it at every step instead of pixel_values).
        media_mask: precomputed `media_attention_mask(...)` rows for these tokens (instead of cross_attention_mask).
        extra_blocks: {tower layer: [fn(h) -> h]} run before that layer, ahead of its image blocks (video).
        positions / mask / cache: as `Transformer.forward` (the KV cache of the self-attention layers)."""
        h = self.embed(input_ids)
        T = h.shape[1]
        if media_kv is None and media is not None:
            media_kv = self.media_kv(media)
        if media_kv is None and pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values need aspect_ratio_ids and aspect_ratio_mask")
            media_kv = self.media_kv(self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        xmask = row = None
        if media_kv is not None and media_mask is not None:
            xmask, row = media_mask
        elif media_kv is not None:
            if cross_attention_mask is None:
                raise ValueError("images were given without a cross_attention_mask")
            xmask, row = media_attention_mask(
                cross_attention_mask[:, -T:], self.vision_encoder.args.num_patches, h.dtype
            )
        inject = {i: list(fns) for i, fns in (extra_blocks or {}).items()}
        if media_kv is not None:  # text-only requests skip cross-attention entirely
            for layer, fns in self.blocks(media_kv, xmask, row).items():
                inject.setdefault(layer, []).extend(fns)
        return self.tower(embeds=h, positions=positions, mask=mask, cache=cache, last_only=last_only, select=select,
                          inject=inject)  # fmt: skip
