"""Image encoder of the Llama 3 paper, as released in Llama 3.2 Vision (ViT-H/14 + gated global layers).

Flow per image (B batch, I images per sample, N tiles, P = (size/14)^2 + 1 tokens per tile, W width):
  pixels [B, I, N, 3, S, S] -> patch conv -> + pre-tile aspect-ratio embedding (gated) -> CLS per tile
  -> + gated positional embedding (shared + per-tile part) -> LayerNorm -> pad tokens to a multiple of 8
  -> ViT layers over all tiles of an image jointly (padded tiles/tokens masked) -> LayerNorm
  -> + post-tile aspect-ratio embedding (gated) -> gated global layers -> strip padding
  -> concat [final output, intermediate features (inputs of the listed layers, interleaved per channel)]
  -> [B, I, N, P, W * (1 + len(intermediate_layers))]

Module and parameter names follow the Hugging Face `MllamaVisionModel` layout (the released weights' precomputed
per-aspect-ratio embeddings), so HF checkpoints map onto it one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.data.image import supported_aspect_ratios


@dataclass(frozen=True)
class VisionArgs:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    global_layers: int = 8
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    num_channels: int = 3
    # which hidden state of layer i is an intermediate feature: its INPUT (Meta's reference code, and
    # transformers 4.x) or its OUTPUT (what transformers 5.x's MllamaVisionModel takes: one layer later)
    intermediate_from: str = "input"
    # optional convolutional stem before the patch projection (an "early convolutions" hybrid ViT, Xiao et al.
    # 2021): one 3x3 stride-2 conv + GELU per entry (its output channels), then the patch projection with a
    # kernel of patch_size / 2**len(stem). Empty (the default, and Llama 3.2 Vision): the plain patch conv.
    stem: tuple[int, ...] = ()
    # convolutions per stem entry: 1 = the stride-2 conv alone; 2 = a 3x3 stride-1 conv + GELU before it (a VGG-style
    # stage: more per-cell capacity at the same token layout)
    stem_depth: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def num_patches(self) -> int:  # tokens per tile, CLS included
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(supported_aspect_ratios(self.max_num_tiles))

    def __post_init__(self):
        if self.stem and self.patch_size % 2 ** len(self.stem):
            raise ValueError(f"patch_size {self.patch_size} is not divisible by 2**{len(self.stem)} (stem {self.stem})")
        if self.stem_depth not in (1, 2):
            raise ValueError(f"stem_depth {self.stem_depth}: 1 (a stride-2 conv per stem entry) or 2 (stride 1 + 2)")

    @property
    def output_dim(self) -> int:
        return self.width * (1 + len(self.intermediate_layers))


class AspectRatioEmbedding(nn.Module):
    """A learned [N, W] offset per aspect-ratio id, added to every token of each tile (tanh-gated)."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.max_num_tiles, self.width = a.max_num_tiles, a.width
        self.embedding = nn.Embedding(a.max_aspect_ratio_id + 1, a.max_num_tiles * a.width)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x_MNPW: torch.Tensor, ratio_ids_M: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(ratio_ids_M).reshape(-1, self.max_num_tiles, 1, self.width)
        return x_MNPW + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """(1 - tanh g) * shared per-token embedding + tanh g * per-(aspect ratio, tile, token) embedding."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.max_num_tiles, self.num_patches, self.width = a.max_num_tiles, a.num_patches, a.width
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(a.width**-0.5 * torch.randn(a.num_patches, a.width))
        self.tile_embedding = nn.Embedding(a.max_aspect_ratio_id + 1, a.max_num_tiles * a.num_patches * a.width)

    def forward(self, x_MNPW: torch.Tensor, ratio_ids_M: torch.Tensor) -> torch.Tensor:
        g = self.gate.tanh()
        x_MNPW = x_MNPW + ((1 - g) * self.embedding).view(1, 1, self.num_patches, self.width)
        tile = self.tile_embedding(ratio_ids_M).reshape(-1, self.max_num_tiles, self.num_patches, self.width)
        return x_MNPW + g * tile


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x_MLW: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        M, L, _ = x_MLW.shape
        q, k, v = (
            p(x_MLW).view(M, L, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(M, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm ViT block; the global layers scale both branches by tanh gates (initialised to pi/4)."""

    def __init__(self, a: VisionArgs, gated: bool = False):
        super().__init__()
        self.self_attn = VisionAttention(a.width, a.heads)
        self.mlp = VisionMLP(a.width, a.mlp_dim)
        self.input_layernorm = nn.LayerNorm(a.width, eps=a.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(a.width, eps=a.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x, mask):
        a = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        f = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * f if self.gated else f)


class VisionStack(nn.Module):
    def __init__(self, a: VisionArgs, n: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(a, gated) for _ in range(n))


def tile_padding_mask(ratio_mask_MN: torch.Tensor, real_tokens: int, tokens: int, dtype) -> torch.Tensor:
    """Additive [M, 1, N*L, N*L] mask as Llama 3.2 Vision builds it: entries whose query AND key are both padding
    (a padded tile, or the pad tokens that round each tile up to a multiple of 8) get the dtype's minimum."""
    M, N = ratio_mask_MN.shape
    pad = (1 - ratio_mask_MN.to(dtype)).view(M, N, 1).repeat(1, 1, tokens)
    pad[:, :, real_tokens:] = 1
    pad = pad.reshape(M, N * tokens, 1)
    return (pad @ pad.transpose(1, 2) * torch.finfo(dtype).min).unsqueeze(1)


def conv_stem(channels_in: int, stem: tuple[int, ...], depth: int = 1) -> nn.Sequential:
    """Per entry of VisionArgs.stem: (depth 2: a 3x3 stride-1 conv + GELU, then) a 3x3 stride-2 conv + GELU, with
    that many output channels: locality for small encoders trained from scratch."""
    layers: list[nn.Module] = []
    for c in stem:
        if depth == 2:
            layers += [nn.Conv2d(channels_in, c, 3, 1, 1), nn.GELU()]
            channels_in = c
        layers += [nn.Conv2d(channels_in, c, 3, 2, 1), nn.GELU()]
        channels_in = c
    return nn.Sequential(*layers)


class VisionEncoder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.conv_stem = conv_stem(a.num_channels, a.stem, a.stem_depth) if a.stem else None
        k = a.patch_size // 2 ** len(a.stem)
        self.patch_embedding = nn.Conv2d(a.stem[-1] if a.stem else a.num_channels, a.width, k, k, bias=False)
        self.class_embedding = nn.Parameter(a.width**-0.5 * torch.randn(a.width))
        self.gated_positional_embedding = GatedPositionalEmbedding(a)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(a)
        self.post_tile_positional_embedding = AspectRatioEmbedding(a)
        self.layernorm_pre = nn.LayerNorm(a.width)
        self.layernorm_post = nn.LayerNorm(a.width)
        self.transformer = VisionStack(a, a.layers, gated=False)
        self.global_transformer = VisionStack(a, a.global_layers, gated=True)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        a = self.args
        B, I, N, C, H, Wd = pixel_values.shape  # noqa: E741
        M = B * I
        w = self.patch_embedding.weight
        x = pixel_values.reshape(M * N, C, H, Wd).to(w.device, w.dtype)
        x = self.patch_embedding(self.conv_stem(x) if self.conv_stem is not None else x)
        x = x.flatten(2).transpose(1, 2)  # [M*N, P-1, W]
        ratio_ids = aspect_ratio_ids.reshape(M)
        x = self.pre_tile_positional_embedding(x.reshape(M, N, -1, a.width), ratio_ids)
        x = torch.cat([self.class_embedding.expand(M * N, 1, a.width), x.reshape(M * N, -1, a.width)], dim=1)
        P = x.shape[1]
        x = self.gated_positional_embedding(x.reshape(M, N, P, a.width), ratio_ids)
        x = self.layernorm_pre(x)
        n_pad = (8 - P % 8) % 8
        x = F.pad(x, (0, 0, 0, n_pad))
        L = P + n_pad
        mask = tile_padding_mask(aspect_ratio_mask.reshape(M, N), P, L, x.dtype)
        h = x.reshape(M, N * L, a.width)
        wanted = set(a.intermediate_layers)
        feats = []
        after = a.intermediate_from == "output"
        for i, layer in enumerate(self.transformer.layers):
            if i in wanted and not after:
                feats.append(h)
            h = layer(h, mask)
            if i in wanted and after:
                feats.append(h)
        h = self.layernorm_post(h)
        h = self.post_tile_positional_embedding(h.reshape(M, N, L, a.width), ratio_ids).reshape(M, N * L, a.width)
        for layer in self.global_transformer.layers:
            h = layer(h, mask)
        # intermediate features interleave per channel (stacked on a last axis, then flattened), as released
        inter = torch.stack(feats, dim=-1).reshape(M, N * L, -1) if feats else h[..., :0]
        out = torch.cat([h, inter], dim=-1).reshape(M, N, L, -1)[:, :, :P]
        return out.reshape(B, I, N, P, -1)
