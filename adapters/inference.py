"""Captioning with a fused image model: images are encoded and their cross-attention K/V computed ONCE per
request; every decode step reuses them (text-only prompts skip cross-attention altogether)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from mm_llama.data.collate import collate_images, cross_attention_mask
from mm_llama.data.image import resize_plain, tile_image
from mm_llama.generate import bos_prefix, generate_ids, left_padded, padding_id

from .fusion import FusedVisionModel
from .xattn import media_attention_mask


def image_tiles(img: Image.Image, a) -> tuple[torch.Tensor, int]:
    """One RGB image -> (normalised tiles [n, 3, S, S], aspect-ratio id) for an encoder with VisionArgs `a`: the
    same in training (adapters/modalities/image.py) and inference. One-tile encoders get a square resize."""
    if a.max_num_tiles == 1:
        return resize_plain(img, a.image_size)[None], 1
    tiles, _, rid = tile_image(img, tile=a.image_size, max_tiles=a.max_num_tiles)
    return tiles, rid


def image_inputs(model: FusedVisionModel, images: Sequence[Sequence[Image.Image]]) -> dict:
    """Per sample a list of RGB images -> pixel_values / aspect_ratio_ids / aspect_ratio_mask / num_tiles."""
    a = model.vision_encoder.args
    return collate_images([[image_tiles(img, a) for img in imgs] for imgs in images], a.max_num_tiles)


def build_prompt_ids(tok, model: FusedVisionModel, n_images: int, prompt: str) -> list[int]:
    """[BOS] + one image token per image + the prompt text."""
    ids = bos_prefix(tok)
    return ids + [model.image_token_id] * n_images + tok.encode(prompt)


@torch.inference_mode()
def caption(
    model: FusedVisionModel,
    tok,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    prompts: str | Sequence[str] = "",
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    media_mode: str = "cached",
    on_token: Callable[[int, int], None] | None = None,
) -> list[str]:
    """One completion per sample. images[b]: an image or a list of images (may be empty: text only).

    media_mode: "cached" (K/V once per request), "recompute_kv" (K/V from cached media tokens at every step),
    "recompute_all" (vision encoder + K/V at every step) -- the last two exist to measure what caching saves."""
    images = [[x] if isinstance(x, Image.Image) else list(x) for x in images]
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    ids = [build_prompt_ids(tok, model, len(imgs), p) for imgs, p in zip(images, prompts)]
    lens = [len(x) for x in ids]
    P, total = max(lens), max(lens) + max_new_tokens
    pix = image_inputs(model, images) if any(images) else None
    forward_extra = None
    if pix is not None:
        a = model.vision_encoder.args
        I = pix["pixel_values"].shape[1]  # noqa: E741
        xmask = torch.zeros(len(ids), total, I, a.max_num_tiles, dtype=torch.long)
        for b, seq in enumerate(ids):
            if not images[b]:
                continue
            m = cross_attention_mask([seq], model.image_token_id, [pix["num_tiles"][b]], a.max_num_tiles)[0]
            xmask[b, P - lens[b] : P, : m.shape[1]] = m
            xmask[b, P:, : m.shape[1]] = m[-1]  # generated tokens see what the last prompt token sees
        device = model.tower.tok_embeddings.weight.device
        xmask = xmask.to(device)
        tensors = {k: pix[k].to(device) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        media = model.encode_images(**tensors) if media_mode != "recompute_all" else None
        media_kv = model.media_kv(media) if media_mode == "cached" else None
        if media_mode == "cached":  # the expanded additive mask and row mask, once for every position
            bias, row = media_attention_mask(xmask, a.num_patches, model.tower.tok_embeddings.weight.dtype)

        def forward_extra(pad: int, start: int, n: int) -> dict:
            extra = {"cross_attention_mask": xmask[:, start : start + n]}
            if media_mode == "cached":
                extra["media_kv"] = media_kv
                extra["media_mask"] = (bias[:, :, start : start + n], row[:, start : start + n])
            elif media_mode == "recompute_kv":
                extra["media"] = media
            else:
                extra.update(tensors)
            return extra

    pad = padding_id(tok)
    out = generate_ids(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=set(tok.stop_ids), pad_id=pad, seed=seed, on_token=on_token, forward_extra=forward_extra,
    )  # fmt: skip
    return [tok.decode(o) for o in out]


@torch.inference_mode()
def caption_video(model, tok, frames_FCHW: torch.Tensor, prompt: str = "", *, max_new_tokens: int = 32,
                  temperature: float = 0.0, on_token=None) -> str:  # fmt: skip
    """Caption one video with a FusedVideoModel: frames encoded and aggregated once; K/V reused at every step."""
    return caption_videos(model, tok, [frames_FCHW], prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          on_token=on_token)[0]  # fmt: skip


def caption_videos(model, tok, videos: Sequence[torch.Tensor], prompts: str | Sequence[str] = "", *,
                   max_new_tokens: int = 32, temperature: float = 0.0, on_token=None) -> list[str]:  # fmt: skip
    """One caption per video ([F, 3, S, S] frames each), decoded as one left-padded batch: each video encoded and
    aggregated once, each block's K/V once per request, every row sees its own video from its `<|video|>` token."""
    if isinstance(prompts, str):
        prompts = [prompts] * len(videos)
    ids = [bos_prefix(tok) + [model.video_token_id] + tok.encode(p) for p in prompts]
    device = model.tok_embeddings.weight.device
    tokens = [model.encode_video(v.to(device)) for v in videos]
    pad = padding_id(tok)
    # the batch as generate_ids lays it out: positions after a row's prompt see what its last prompt token sees
    kvs, bias, row = model.video_inputs(tokens, left_padded(ids, pad, max_new_tokens).to(device))

    def forward_extra(pad: int, start: int, n: int) -> dict:
        return {"video_state": (kvs, bias[:, :, start : start + n], row[:, start : start + n])}

    out = generate_ids(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=set(tok.stop_ids),
        pad_id=pad, on_token=on_token, forward_extra=forward_extra,
    )  # fmt: skip
    return [tok.decode(o) for o in out]
