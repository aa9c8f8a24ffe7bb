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
from mm_llama.data.conversation import Part
from mm_llama.data.image import normalize_tiles
from mm_llama.data.media import VIDEO

from ..image import build_image_part
from ..modality import DataHooks, EvalHooks, InferenceHooks, Modality, PartHooks, ScaleHooks, decode_member
from ..plan import Piece, PlanPieces, tensor_bytes
from ..samples import plain_requests
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


def video_state(model, clips: list, input_ids: torch.Tensor, cache_kv: bool, segments=None):
    """Per-block keys/values of each sample's clips side by side (or the clip tokens, `cache_kv=False`), and the
    additive bias / row mask for every position of `input_ids`: a sample's k-th clip is seen from its k-th
    `<|video|>` token on (one clip: from its token on, as the video stage trains); in packed rows (`segments`
    [B, T]) only by its own sample's positions."""
    part = model.video
    B = input_ids.shape[0]
    S = max(sum(v.shape[0] for v in c) for c in clips)
    dev = input_ids.device
    media = torch.zeros(B, S, model.args.dim, dtype=model.tok_embeddings.weight.dtype, device=dev)
    clip_of_key = torch.full((B, S), -1, dtype=torch.long, device=dev)  # -1: padding
    for b, c in enumerate(clips):
        start = 0
        for k, v in enumerate(c):
            media[b, start : start + v.shape[0]], clip_of_key[b, start : start + v.shape[0]] = v, k
            start += v.shape[0]
    is_clip = input_ids == model.token_id("video")
    seen = is_clip.long().cumsum(1)  # [B, T]: clips whose token is at or before
    allowed = (clip_of_key[:, None, :] >= 0) & (clip_of_key[:, None, :] < seen[:, :, None])
    if segments is not None:  # clip k belongs to the sample of the k-th <|video|> token
        seg_of_clip = torch.full((B, S), -2, dtype=torch.long, device=dev)
        for b in range(B):
            owners = segments[b][is_clip[b]]
            k = clip_of_key[b]
            seg_of_clip[b, k >= 0] = owners[k[k >= 0]]
        allowed &= seg_of_clip[:, None, :] == segments[:, :, None]
    bias, row = masks_from_allowed(allowed, media.dtype)
    blocks = part.video_cross_attention_layers
    kv = [blk.media_kv(media) for blk in blocks] if cache_kv else [media] * len(blocks)
    return kv, bias, row


def _clips(v) -> list:
    """A sample's clips: a list of [F, C, H, W] tensors, one tensor (one clip) or None (none)."""
    if v is None:
        return []
    return [v] if torch.is_tensor(v) else list(v)


def prepare(model, input_ids, inputs, cache_kv):
    videos = inputs.get("videos")
    clips = [_clips(v) for v in videos] if videos is not None else []
    if not any(clips):
        return None
    tokens = [[model.video.encode(model.image, c) for c in sample] for sample in clips]
    return video_state(model, tokens, input_ids, cache_kv, inputs.get("segment_ids"))


# --- data and inference -----------------------------------------------------------------------------------------
class VideoMedia:
    """A video part -> one `<|video|>` id + `frames` frames at the encoder's size; picklable."""

    def __init__(self, image_size: int, frames: int, token_id: int):
        self.image_size, self.frames, self.token_id = image_size, frames, token_id

    def decode(self, data: bytes, name: str, ext: str) -> torch.Tensor:
        return VIDEO.decode(data, name, ext, num_frames=self.frames, size=self.image_size)

    def plain(self, raw: dict, ext: str) -> torch.Tensor:
        return decode_member(raw, VIDEO, num_frames=self.frames, size=self.image_size)

    def splice(self, frames_uint8: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        return [self.token_id], normalize_tiles(frames_uint8)


def media(model, tok, opts, cfg=None) -> VideoMedia:
    frames = cfg.video.frames if cfg is not None else opts.frames
    return VideoMedia(model.image.vision_args.image_size, frames, model.token_id("video"))


def turn(part, opts) -> list:
    """A caption request: the clip, then the prompt."""
    return [part, Part("text", opts.prompt)]


def collate(items: list[dict]) -> dict:
    if not any(it.get("video") for it in items):
        return {}
    return {"videos": [list(it["video"]) if it.get("video") else None for it in items]}


def requests(model, tok, data: bytes, name: str, ext: str, opts):
    clip = media(model, tok, opts).decode(data, name, ext)
    return plain_requests(model, tok, "video", [clip], name, opts), None


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
    data=DataHooks(medium=VIDEO, media=media, turn=turn, collate=collate),
    inference=InferenceHooks(what="video caption", requests=requests),
    evaluation=EvalHooks(metrics=caption_metrics),
    scale=ScaleHooks(shard_units=shard_units, plan_pieces=plan_pieces, file_options=("image_adapter",)),
)
