"""Video: the paper's perceiver temporal aggregator + video cross-attention, on a (frozen) image part.

A sample is laid out `[BOS] <|video|> PROMPT` + caption; text sees a clip from its `<|video|>` token on. The video
part has no token table: `<|video|>` reads row 1 of the image part's table (what the video stage trains on, frozen),
so a video adapter always travels with the image adapter it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mm_llama.assets import resolve
from mm_llama.config import bounded, choice
from mm_llama.data.collate import build_example
from mm_llama.data.image import normalize_tiles
from mm_llama.data.media import VIDEO
from mm_llama.generate import bos_prefix

from ..image import build_image_part
from ..modality import DataHooks, EvalHooks, InferenceHooks, Modality, PartHooks, ScaleHooks, decode_member, text_target
from ..plan import Piece, PlanPieces, tensor_bytes
from ..video import AggregatorArgs, VideoPart
from ..xattn import masks_from_allowed
from .image import caption_metrics, release_part, slice_positions


@dataclass
class VideoConfig:
    image_adapter: str | None = None  # the trained image adapter to start from (frozen); None: a fresh one
    frames: int = bounded(8, 1)
    merge: int = bounded(4, 1)  # frames per effective frame (32 for 64-frame SFT input, 16 for pretraining)
    heads: int = bounded(4, 1)
    every: int = bounded(4, 1)  # a video block before every N-th image block (counted from the top)
    query_init: str = choice("learned", "learned", "frame_mean")  # aggregator start (adapters/video.py)
    max_groups: int = bounded(0, 0)  # > 0: order embeddings for up to this many effective frames
    init_from_image: bool = False  # video blocks start as copies of the image blocks at their layers


# --- the part -------------------------------------------------------------------------------------------------
def base_parts(tower, cfg) -> dict:
    """The frozen image part a video run trains on: the adapter file `video.image_adapter` (a path: the caller
    loads it), else the release's, else a fresh one."""
    if cfg.video.image_adapter:
        return {"image": resolve(cfg.video.image_adapter)}
    if cfg.image.release:
        return {"image": release_part(tower, cfg.image.release)}
    return {"image": build_image_part(tower, cfg.image.vision)}


def build(tower, cfg, parts) -> VideoPart:
    c = cfg.video
    agg = AggregatorArgs(merge=c.merge, heads=c.heads, query_init=c.query_init, max_groups=c.max_groups)
    return VideoPart.on_image(parts["image"], agg, every=c.every, init_from_image=c.init_from_image)


def meta(part: VideoPart) -> dict:
    return {"aggregator": dataclasses.asdict(part.aggregator.args), "video_schedule": part.video_schedule}


def from_meta(tower, meta: dict, parts: dict, source: str) -> VideoPart:
    return VideoPart.on_image(parts["image"], AggregatorArgs(**meta["aggregator"]), schedule=meta["video_schedule"])


def video_state(model, tokens: list, input_ids: torch.Tensor, cache_kv: bool):
    """Per-block keys/values of the padded clips (or the clip tokens, `cache_kv=False`), and the additive bias / row
    mask for every position of `input_ids` (a sample's text sees its clip from its `<|video|>` token on)."""
    part = model.video
    B = input_ids.shape[0]
    S = max(v.shape[0] for v in tokens if v is not None)
    media = torch.zeros(B, S, model.args.dim, dtype=model.tok_embeddings.weight.dtype, device=input_ids.device)
    key_ok = torch.zeros(B, S, dtype=torch.bool, device=input_ids.device)
    for b, v in enumerate(tokens):
        if v is not None:
            media[b, : v.shape[0]], key_ok[b, : v.shape[0]] = v, True
    seen = (input_ids == model.token_id("video")).long().cumsum(1) > 0
    bias, row = masks_from_allowed(seen[:, :, None] & key_ok[:, None, :], media.dtype)
    blocks = part.video_cross_attention_layers
    kv = [blk.media_kv(media) for blk in blocks] if cache_kv else [media] * len(blocks)
    return kv, bias, row


def prepare(model, input_ids, inputs, cache_kv):
    videos = inputs.get("videos")
    if videos is None or all(v is None for v in videos):
        return None
    tokens = [None if v is None else model.video.encode(model.image, v) for v in videos]
    return video_state(model, tokens, input_ids, cache_kv)


# --- data and inference -----------------------------------------------------------------------------------------
class VideoSamples:
    """Items laid out `[BOS] <|video|> PROMPT` (+ caption in training) with `frames` frames at the encoder's size."""

    def __init__(self, image_size: int, frames: int, token_id: int, tok, prompt: str, max_text_tokens: int = 0):
        self.image_size, self.frames, self.token_id, self.tok = image_size, frames, token_id, tok
        self.prompt, self.max_text = prompt, max_text_tokens

    @classmethod
    def of(cls, model, tok, frames: int, prompt: str, max_text_tokens: int = 0) -> VideoSamples:
        size = model.image.vision_args.image_size
        return cls(size, frames, model.token_id("video"), tok, prompt, max_text_tokens)

    def request(self, frames_uint8: torch.Tensor) -> dict:
        ids = bos_prefix(self.tok) + [self.token_id] + self.tok.encode(self.prompt)
        return {"input_ids": ids, "video": normalize_tiles(frames_uint8)}

    def decode(self, data: bytes, name: str, ext: str) -> torch.Tensor:
        return VIDEO.decode(data, name, ext, num_frames=self.frames, size=self.image_size)

    def __call__(self, raw: dict) -> dict:
        target = text_target(self.tok, raw, self.max_text)
        item = self.request(decode_member(raw, VIDEO, num_frames=self.frames, size=self.image_size))
        return {**item, **build_example(item["input_ids"], target)}


def samples(model, tok, cfg) -> VideoSamples:
    return VideoSamples.of(model, tok, cfg.model.video.frames, cfg.data.prompt, cfg.data.max_text_tokens)


def collate(items: list[dict]) -> dict:
    if all(it.get("video") is None for it in items):
        return {}
    return {"videos": [it.get("video") for it in items]}


def requests(model, tok, data: bytes, name: str, ext: str, opts):
    maker = VideoSamples.of(model, tok, opts.frames, opts.prompt)
    return [maker.request(maker.decode(data, name, ext))], None


# --- scale ------------------------------------------------------------------------------------------------------
def shard_units(part: VideoPart) -> list:  # its image part's units come with the image plug-in
    return [*part.video_cross_attention_layers, *part.aggregator.layers]


def plan_pieces(part: VideoPart, parts, batch: int, seq_len: int, dtype, cfg) -> PlanPieces:
    meta_dev, dim = {"device": "meta"}, part.tower_args.dim
    # the frozen image encoder runs without a graph (VideoPart.encode): the aggregator and the video blocks keep what
    # backward needs; video samples carry no image, so the image blocks are skipped
    tokens_per_frame = parts["image"].vision_args.num_patches
    feats = torch.empty(batch * cfg.video.frames, tokens_per_frame, dim, dtype=dtype, **meta_dev)
    tokens = part.aggregator(feats).reshape(batch, -1, dim)  # [B, S, D]
    x = torch.empty(batch, seq_len, dim, dtype=dtype, requires_grad=True, **meta_dev)
    bias = torch.empty(batch, 1, seq_len, tokens.shape[1], dtype=dtype, **meta_dev)
    row = torch.empty(batch, seq_len, 1, dtype=dtype, **meta_dev)
    blk = part.video_cross_attention_layers[0]
    pieces = [
        Piece("temporal aggregator", lambda: part.aggregator(feats), units=tuple(part.aggregator.layers)),
        Piece(
            "video cross-attention blocks",
            lambda: blk(x, tokens, bias, row),
            repeats=len(part.video_cross_attention_layers),
            shared=(tokens, bias, row),
            units=(blk,),
        ),
    ]
    rows = parts["image"].learnable_embedding.weight.requires_grad
    lowest = 0 if rows else min(part.video_schedule)
    return PlanPieces(pieces, shared_bytes=tensor_bytes(tokens, bias, row), lowest_layer=lowest)


SPEC = Modality(
    name="video",
    format="mm_llama.video_adapter.v1",
    rows=1,  # <|video|>, read from the image part's table (row 1)
    requires=("image",),
    part=PartHooks(
        Config=VideoConfig,
        build=build,
        base_parts=base_parts,
        meta=meta,
        from_meta=from_meta,
        row_table=lambda parts: (parts["image"].learnable_embedding, 1),
        inputs=("videos",),
        prepare=prepare,
        blocks=lambda model, state: model.video.blocks(*state),
        step_state=slice_positions,
    ),
    data=DataHooks(medium=VIDEO, samples=samples, collate=collate),
    inference=InferenceHooks(what="video caption", requests=requests),
    evaluation=EvalHooks(metrics=caption_metrics),
    scale=ScaleHooks(shard_units=shard_units, plan_pieces=plan_pieces, file_options=("image_adapter",)),
)
