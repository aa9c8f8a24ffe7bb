"""The paper's video path: frames -> image encoder -> perceiver temporal aggregator -> video cross-attention.

Each sampled frame goes through the (frozen) image encoder and projection. The aggregator merges every `merge`
consecutive frames into one "effective frame": latents (one per output token) cross-attend to the tokens of the
group's frames, which carry learned frame-in-group (time) embeddings; frames missing from a short last group are
masked. Video cross-attention blocks (own tanh gates) run before every `every`-th image cross-attention block and
read all effective frames; text sees a video only after its `<|video|>` token. In the video stage only the
aggregator and the video blocks train (the image part is frozen).

Two start points (`AggregatorArgs.query_init`):
- "learned" (default): free latents, the perceiver's own output norm; the video blocks start with closed gates.
  The paper leaves the initialisation open; from here the blocks see nearly the same summary for every clip at
  first (an average over mostly background tokens), and a short run learns little from it.
- "frame_mean": latent p starts as the group's time-averaged token p (plus a learned offset, zero at first), the
  perceiver's output projections start at zero and there is no output norm, so an untrained aggregator hands on
  the averaged frame itself, at the image tokens' scale; with `VideoPart.on_image(..., init_from_image=True)` the video
  blocks start as copies of the trained image blocks at their layers, so the model reads a clip like a still
  image from the first step and training only has to add what changes over time.
`max_groups` > 0 adds a learned order embedding per effective frame, in units of each token's RMS and random at
half that scale at first: without it the video blocks see a set of effective frames and cannot tell the first from
the second.

Shape legend: B batch, F frames, G groups (effective frames), P tokens per frame, L latents, D tower width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.llama.config import ModelArgs
from mm_llama.llama.model import RMSNorm

from .image import ImagePart, default_schedule
from .xattn import GatedCrossAttentionBlock


@dataclass(frozen=True)
class AggregatorArgs:
    merge: int = 32  # frames per effective frame (32 for 64-frame SFT input, 16 for pretraining's 16 frames)
    depth: int = 1
    heads: int = 32
    ffn_mult: int = 2
    latents: int | None = None  # tokens per effective frame (default: the image encoder's tokens per frame)
    query_init: str = "learned"  # "learned" | "frame_mean" (see the module docstring)
    max_groups: int = 0  # > 0: learned order embeddings for up to this many effective frames


class PerceiverLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn_mult: int):
        super().__init__()
        self.heads = heads
        self.norm_latents = RMSNorm(d)
        self.norm_tokens = RMSNorm(d)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d)
        self.w1 = nn.Linear(d, ffn_mult * d, bias=False)
        self.w2 = nn.Linear(ffn_mult * d, d, bias=False)

    def forward(self, lat_GLD, tok_GSD, time_GSD, key_ok_GS):
        """time embeddings are added to the normalised tokens, so their scale does not depend on the encoder's."""
        G, L, D = lat_GLD.shape
        q = self.wq(self.norm_latents(lat_GLD)).view(G, L, self.heads, -1).transpose(1, 2)
        toks = self.norm_tokens(tok_GSD) + time_GSD
        kv_in = torch.cat([toks, self.norm_latents(lat_GLD)], 1)  # latents also attend to themselves
        k = self.wk(kv_in).view(G, kv_in.shape[1], self.heads, -1).transpose(1, 2)
        v = self.wv(kv_in).view(G, kv_in.shape[1], self.heads, -1).transpose(1, 2)
        ok = torch.cat([key_ok_GS, torch.ones(G, L, dtype=torch.bool, device=key_ok_GS.device)], 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ok[:, None, None, :])
        lat_GLD = lat_GLD + self.wo(o.transpose(1, 2).reshape(G, L, D))
        return lat_GLD + self.w2(F.gelu(self.w1(self.ffn_norm(lat_GLD))))


class TemporalAggregator(nn.Module):
    def __init__(self, d: int, tokens_per_frame: int, a: AggregatorArgs):
        super().__init__()
        self.args = a
        L = a.latents or tokens_per_frame
        if a.query_init not in ("learned", "frame_mean"):
            raise ValueError(f"AggregatorArgs.query_init must be 'learned' or 'frame_mean', not {a.query_init!r}")
        self.frame_mean = a.query_init == "frame_mean"
        if self.frame_mean and L != tokens_per_frame:
            raise ValueError(f"query_init='frame_mean' needs one latent per frame token ({tokens_per_frame}), not {L}")
        self.latents = nn.Parameter(torch.zeros(L, d) if self.frame_mean else torch.randn(L, d) * d**-0.5)
        # unit scale, like the normalised frame tokens it is added to: frame order is visible from the first step
        self.time_embedding = nn.Parameter(torch.randn(a.merge, d))
        self.layers = nn.ModuleList(PerceiverLayer(d, a.heads, a.ffn_mult) for _ in range(a.depth))
        if self.frame_mean:  # each layer starts as the identity: the output is the averaged frame
            for layer in self.layers:
                nn.init.zeros_(layer.wo.weight)
                nn.init.zeros_(layer.w2.weight)
        self.norm = nn.Identity() if self.frame_mean else RMSNorm(d)
        # order embeddings act in units of each token's RMS (frame tokens of a trained encoder can sit far from
        # unit scale); they start random at half that scale, so the first and second effective frame differ at once
        self.group_embedding = nn.Parameter(0.5 * torch.randn(a.max_groups, d)) if a.max_groups else None

    def num_groups(self, n_frames: int) -> int:
        return -(-n_frames // self.args.merge)

    def forward(self, frames_FPD: torch.Tensor) -> torch.Tensor:
        """One video's frame tokens [F, P, D] -> effective frames [G, L, D] (G = ceil(F / merge))."""
        Fr, P, D = frames_FPD.shape
        m = self.args.merge
        G = self.num_groups(Fr)
        if self.group_embedding is not None and G > self.group_embedding.shape[0]:
            raise ValueError(
                f"{Fr} frames make {G} effective frames (merge {m}), but this aggregator has order "
                f"embeddings for {self.group_embedding.shape[0]}: sample at most "
                f"{self.group_embedding.shape[0] * m} frames"
            )
        pad = G * m - Fr
        x = torch.cat([frames_FPD, frames_FPD.new_zeros(pad, P, D)]) if pad else frames_FPD
        x = x.view(G, m, P, D)
        valid = torch.arange(G * m, device=x.device) < Fr  # [G*m]
        ok = valid.view(G, m, 1).expand(G, m, P).reshape(G, m * P)
        time = self.time_embedding[None, :, None, :].to(x.dtype).expand(G, m, P, D).reshape(G, m * P, D)
        lat = self.latents[None].expand(G, -1, -1).to(x.dtype)
        if self.frame_mean:  # latent p starts at the group's average of frame token p (real frames only)
            n = valid.view(G, m).sum(1).clamp(min=1).to(x.dtype)
            lat = lat + x.sum(1) / n[:, None, None]  # padded frames are zeros
        for layer in self.layers:
            lat = layer(lat, x.reshape(G, m * P, D), time, ok)
        out = self.norm(lat)
        if self.group_embedding is not None:
            rms = out.float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype)
            out = out + rms * self.group_embedding[:G, None, :].to(out.dtype)
        return out


def video_schedule(image_schedule: list[int], every: int = 4) -> list[int]:
    """Tower layers of the video blocks: before every `every`-th image block, counted from the top
    (8B: 8 image blocks -> 2 video blocks; 70B: 20 -> 5)."""
    picks = default_schedule(len(image_schedule), every)
    return [image_schedule[k] for k in picks]


class VideoPart(nn.Module):
    """Temporal aggregator + video cross-attention blocks. It reads frames through an image part's (frozen) encoder
    and has no token rows of its own: `<|video|>` reads row 1 of the image part's table (adapters/modalities/video.py),
    so a video adapter always travels with the image adapter it was trained on."""

    def __init__(self, tower_args: ModelArgs, tokens_per_frame: int, agg: AggregatorArgs, schedule: list[int]):
        super().__init__()
        self.tower_args = tower_args
        self.aggregator = TemporalAggregator(tower_args.dim, tokens_per_frame, agg)
        self.video_schedule = list(schedule)
        self.video_cross_attention_layers = nn.ModuleList(
            GatedCrossAttentionBlock.for_tower(tower_args) for _ in self.video_schedule
        )

    @classmethod
    def on_image(
        cls,
        image: ImagePart,
        agg: AggregatorArgs,
        every: int = 4,
        schedule: list[int] | None = None,
        init_from_image: bool = False,
    ) -> VideoPart:
        """A video part for this image part. schedule: explicit tower layers for the video blocks (default: before
        every `every`-th image block); init_from_image: each video block starts as a copy of the image block at its
        layer (gates included)."""
        schedule = list(schedule) if schedule is not None else video_schedule(image.schedule, every)
        bad = [k for k in schedule if k not in image.schedule]
        if bad:
            raise ValueError(
                f"video blocks at tower layers {bad} have no image block in this image part "
                f"(its schedule: {image.schedule})"
            )
        part = cls(image.tower_args, image.vision_args.num_patches, agg, schedule)
        if init_from_image:
            for layer, blk in zip(schedule, part.video_cross_attention_layers, strict=True):
                blk.load_state_dict(image.cross_attention_layers[image.schedule.index(layer)].state_dict())
        return part

    def encode(self, image: ImagePart, frames_FCHW: torch.Tensor) -> torch.Tensor:
        """One video's frames (normalised, square, the encoder's size) -> effective-frame tokens [G*L, D]: each
        frame is one single-tile image through the image part (frozen: no graph), then the aggregator."""
        va = image.vision_args
        with torch.no_grad():
            Fr = frames_FCHW.shape[0]
            tiles = frames_FCHW.new_zeros(Fr, 1, va.max_num_tiles, *frames_FCHW.shape[1:])
            tiles[:, 0, 0] = frames_FCHW
            ratio_ids = torch.ones(Fr, 1, dtype=torch.long, device=frames_FCHW.device)
            ratio_mask = torch.zeros(Fr, 1, va.max_num_tiles, dtype=torch.long, device=frames_FCHW.device)
            ratio_mask[..., 0] = 1
            feats = image.encode(tiles, ratio_ids, ratio_mask)[:, : va.num_patches]  # the first tile's tokens
        return self.aggregator(feats).reshape(-1, feats.shape[-1])

    def blocks(self, kv: list, bias_B1TS: torch.Tensor, row_BT1: torch.Tensor) -> dict[int, list]:
        """{tower layer: [h -> h]}: the video blocks for the tower's `inject=` (kv as `ImagePart.blocks`)."""
        out: dict[int, list] = {}
        for k, layer in enumerate(self.video_schedule):
            blk, kv_k = self.video_cross_attention_layers[k], kv[k]
            out.setdefault(layer, []).append(lambda h, blk=blk, kv_k=kv_k: blk(h, kv_k, bias_B1TS, row_BT1))
        return out
