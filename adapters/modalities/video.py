"""Video: the paper's perceiver temporal aggregator + video cross-attention, on a (frozen) image adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_llama.assets import resolve
from mm_llama.config import bounded, choice
from mm_llama.data.video import VIDEO_EXTS

from ..fusion import TOKEN_ROWS
from ..modality import AnswerOptions, Modality, require_member, text_target


@dataclass
class VideoConfig:
    image_adapter: str | None = None  # the trained image adapter to start from (frozen); None: a fresh one
    frames: int = bounded(8, 1)
    merge: int = bounded(4, 1)  # frames per effective frame (32 for 64-frame SFT input, 16 for pretraining)
    heads: int = bounded(4, 1)
    every: int = bounded(4, 1)  # a video block before every N-th image block (counted from the top)
    query_init: str = choice(
        "learned", "learned", "frame_mean"
    )  # aggregator start: learned | frame_mean (adapters/video.py)
    max_groups: int = bounded(0, 0)  # > 0: order embeddings for up to this many effective frames
    init_from_image: bool = False  # video blocks start as copies of the image blocks at their layers


class VideoSamples:
    """raw sample -> prompt `[BOS] <|video|> PROMPT` + caption, and `frames` frames at the encoder's size."""

    def __init__(self, image_size: int, frames: int, token_id: int, tok, prompt: str, max_text_tokens: int):
        self.image_size, self.frames, self.token_id, self.tok = image_size, frames, token_id, tok
        self.prompt, self.max_text = prompt, max_text_tokens

    def __call__(self, raw: dict) -> dict:
        from mm_llama.data.collate import build_example
        from mm_llama.data.image import normalize_tiles
        from mm_llama.data.video import decode_video
        from mm_llama.generate import bos_prefix

        target = text_target(self.tok, raw, self.max_text)
        ext = require_member(raw, VIDEO_EXTS, "video")
        frames = decode_video(raw[ext], raw["__key__"], num_frames=self.frames, size=self.image_size)
        item = build_example(bos_prefix(self.tok) + [self.token_id] + self.tok.encode(self.prompt), target)
        return {**item, "video": normalize_tiles(frames)}


class Video(Modality):
    name = "video"
    exts = VIDEO_EXTS
    what = "video caption"
    format = "mm_llama.video_adapter.v1"
    token_rows = TOKEN_ROWS["video"]
    requires = ("image",)
    inputs = ("videos", "video_state")
    Config = VideoConfig

    def build(self, tower, cfg, parts):
        from ..builders import attach_image_adapter
        from ..checkpoint import load_adapter
        from ..video import AggregatorArgs, FusedVideoModel

        c = cfg.video
        from .image import release_adapter

        if "image" in parts:  # given (the memory plan's meta-device model)
            image = parts["image"]
        elif c.image_adapter:
            image = load_adapter(tower, resolve(c.image_adapter))
        elif cfg.image.release:
            image = release_adapter(tower, cfg.image.release)
        else:
            image = attach_image_adapter(tower, cfg.image.vision)
        agg = AggregatorArgs(merge=c.merge, heads=c.heads, query_init=c.query_init, max_groups=c.max_groups)
        return FusedVideoModel(image, agg, every=c.every, init_from_image=c.init_from_image)

    def save(self, part, path):
        from ..video import save_video_adapter

        save_video_adapter(part, path)

    def load(self, tower, path, parts):
        from ..video import load_video_adapter

        return load_video_adapter(parts["image"], path)

    def row_table(self, part):
        return part.image_model.learnable_embedding

    def prepare(self, model, input_ids, inputs):
        if inputs.get("video_state") is not None:
            return inputs["video_state"]
        videos = inputs.get("videos")
        if videos is None or all(v is None for v in videos):
            return None
        tokens = [None if v is None else model.video.encode_video(v) for v in videos]
        return model.video.video_inputs(tokens, input_ids, token_id=model.token_id("video"), kv=False)

    def blocks(self, model, state):
        return model.video.blocks(state)

    def plan_pieces(self, part, batch, seq_len, dtype, cfg):
        from ..plan import Piece, PlanPieces, tensor_bytes

        meta, dim = {"device": "meta"}, part.args.dim
        # the frozen image encoder runs without a graph (encode_video): the aggregator and the video blocks keep what
        # backward needs; video samples carry no image, so the image blocks are skipped
        feats = torch.empty(batch * cfg.video.frames, part.image_model.vision_encoder.args.num_patches, dim,
                            dtype=dtype, **meta)  # fmt: skip
        tokens = part.aggregator(feats).reshape(batch, -1, dim)  # [B, S, D]
        x = torch.empty(batch, seq_len, dim, dtype=dtype, requires_grad=True, **meta)
        bias = torch.empty(batch, 1, seq_len, tokens.shape[1], dtype=dtype, **meta)
        row = torch.empty(batch, seq_len, 1, dtype=dtype, **meta)
        blk = part.video_cross_attention_layers[0]
        pieces = [
            Piece("temporal aggregator", lambda: part.aggregator(feats), units=tuple(part.aggregator.layers)),
            Piece("video cross-attention blocks", lambda: blk(x, tokens, bias, row),
                  repeats=len(part.video_cross_attention_layers), shared=(tokens, bias, row), units=(blk,)),
        ]  # fmt: skip
        rows = part.image_model.learnable_embedding.weight.requires_grad
        return PlanPieces(pieces, shared_bytes=tensor_bytes(tokens, bias, row),
                          lowest_layer=0 if rows else min(part.video_schedule))  # fmt: skip

    def shard_units(self, part):  # its image part's units come with the image plug-in (a composed model has both)
        return [*part.video_cross_attention_layers, *part.aggregator.layers]

    def sample_maker(self, model, tok, cfg):
        size = model.video.image_model.vision_encoder.args.image_size
        return VideoSamples(size, cfg.model.video.frames, model.token_id("video"), tok, cfg.data.prompt,
                            cfg.data.max_text_tokens)  # fmt: skip

    def collate(self, items):
        return {"videos": [it["video"] for it in items]}

    def _frames(self, model, data: bytes, name: str, n: int):
        from mm_llama.data.image import normalize_tiles
        from mm_llama.data.video import decode_video

        size = model.video.image_model.vision_encoder.args.image_size
        return normalize_tiles(decode_video(data, name, num_frames=n, size=size))

    def answer(self, model, tok, name, data, opts: AnswerOptions):
        from ..inference import caption_video

        text = caption_video(model.video, tok, self._frames(model, data, name, opts.frames), opts.prompt,
                             max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                             on_token=opts.on_token)  # fmt: skip
        return text, None

    def hypotheses(self, model, tok, samples, opts):
        from ..inference import caption_videos

        frames = [self._frames(model, s[require_member(s, VIDEO_EXTS, "video")], s["__key__"], opts.frames)
                  for s in samples]  # fmt: skip
        return caption_videos(model.video, tok, frames, opts.prompt, max_new_tokens=opts.max_new_tokens)

    def metrics(self, references, hypotheses):
        from .image import SPEC as IMAGE

        return IMAGE.metrics(references, hypotheses)


SPEC = Video()
