"""Image: the Llama 3.2 Vision-compatible part (ViT encoder + gated cross-attention before every 4th layer).

A sample is laid out `[BOS] <|image|> PROMPT` + caption; text sees an image from its `<|image|>` token on (the
cross-attention mask is built from the token positions as transformers' Mllama processor builds it, so several
images per sample follow Llama 3.2 Vision's rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors.torch import load_file

from mm_llama.assets import resolve
from mm_llama.config import bounded, choice
from mm_llama.data.collate import collate_images, cross_attention_mask
from mm_llama.data.conversation import Part
from mm_llama.data.image import resize_plain, tile_image
from mm_llama.data.media import IMAGE
from mm_llama.text import normalize_text

from ..hf_mllama import load_hf_mllama
from ..image import VISION_PRESETS, ImagePart, build_image_part
from ..modality import (
    DataHooks,
    EvalHooks,
    InferenceHooks,
    Modality,
    PartHooks,
    ScaleHooks,
    decode_member,
)
from ..plan import Piece, PlanPieces, tensor_bytes
from ..samples import plain_requests
from ..vision import VisionArgs


@dataclass
class ImageConfig:
    vision: str = choice("debug", *VISION_PRESETS)  # image encoder preset (adapters/image.py)
    vision_init: str | None = None  # safetensors of pretrained image-encoder weights (VisionEncoder names)
    # an HF Mllama folder (Llama 3.2 Vision): start from its released adapter (encoder, projection, cross-attention,
    # token rows; their shapes and placement come from the folder, `vision`/`xattn_*` are not used); the tower must
    # be the folder's text model (tower.path: the same folder)
    release: str | None = None
    freeze_vision: bool = False  # train only projection + cross-attention (+ token rows) on a pretrained encoder
    xattn_every: int = bounded(4, 1)  # cross-attention before every N-th tower layer (counted from the top)
    xattn_count: int | None = bounded(None, 1)  # only the top N of those (None: all): backward stops at the lowest
    train_token_rows: bool = True  # the new tokens' rows; frozen, the tower below the first block is forward-only


# --- the part -------------------------------------------------------------------------------------------------
def release_part(tower, folder) -> ImagePart:
    """The image part of an HF Mllama folder for `tower` (its text model, loaded already), fp32, frozen."""
    dev = tower.tok_embeddings.weight.device
    return load_hf_mllama(resolve(folder), torch.float32, "meta" if dev.type == "meta" else "cpu", tower=tower)


def build(tower, cfg, parts) -> ImagePart:
    c = cfg.image
    if c.release:
        part = release_part(tower, c.release).requires_grad_(True)
    else:
        part = build_image_part(tower, c.vision, every=c.xattn_every, n_xattn=c.xattn_count)
    part.learnable_embedding.requires_grad_(c.train_token_rows)
    if c.vision_init:
        part.vision_encoder.load_state_dict(load_file(resolve(c.vision_init)))
    if c.freeze_vision:
        part.vision_encoder.requires_grad_(False)
    return part


def meta(part: ImagePart) -> dict:
    vision = dataclasses.asdict(part.vision_args)
    vision.pop("extra", None)
    return {"vision": vision, "schedule": part.schedule}


def from_meta(tower, meta: dict, parts: dict, source: str) -> ImagePart:
    v = dict(meta["vision"])
    v["intermediate_layers"] = tuple(v["intermediate_layers"])
    v["stem"] = tuple(v.get("stem", ()))  # files written before the stem existed have none
    return ImagePart(tower.args, VisionArgs(**v), meta["schedule"])


def image_mask(input_ids_BT, token_id: int, ratio_ids_BI, ratio_mask_BIN, segments_BT=None) -> torch.Tensor:
    """transformers' cross_attention_mask [B, T, I, N] from the `<|image|>` positions (padding images: ratio id 0);
    in packed rows (`segments_BT`) each sample sees only its own images."""
    num_tiles = [
        [int(n) for n, rid in zip(ratio_mask_BIN[b].sum(-1).tolist(), ratio_ids_BI[b].tolist()) if rid != 0]
        for b in range(input_ids_BT.shape[0])
    ]
    segments = None if segments_BT is None else segments_BT.tolist()
    mask = cross_attention_mask(input_ids_BT.tolist(), token_id, num_tiles, ratio_mask_BIN.shape[-1], segments=segments)
    return mask.to(input_ids_BT.device)


def prepare(model, input_ids, inputs, cache_kv):
    if inputs.get("pixel_values") is None:
        return None
    missing = [k for k in ("aspect_ratio_ids", "aspect_ratio_mask") if inputs.get(k) is None]
    if missing:
        raise ValueError(f"pixel_values need {', '.join(missing)}")
    part = model.image
    media = part.encode(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    # training: each block computes its keys/values from the media in its own forward (FSDP2-shardable)
    kv = part.media_kv(media) if cache_kv else [media] * len(part.cross_attention_layers)
    xmask = inputs.get("cross_attention_mask")
    if xmask is None:
        ids, token = input_ids, model.token_id("image")
        xmask = image_mask(
            ids, token, inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"], inputs.get("segment_ids")
        )
    bias, row = part.masks(xmask[:, -input_ids.shape[1] :], model.tower.tok_embeddings.weight.dtype)
    return kv, bias, row


def slice_positions(state, start: int, n: int):
    kv, bias, row = state
    return kv, bias[:, :, start : start + n], row[:, start : start + n]


# --- data and inference -----------------------------------------------------------------------------------------
def image_tiles(img: Image.Image, a: VisionArgs) -> tuple[torch.Tensor, int]:
    """One RGB image -> (normalised tiles [n, 3, S, S], aspect-ratio id) for an encoder with VisionArgs `a`: the
    same in training and inference. One-tile encoders get a square resize."""
    if a.max_num_tiles == 1:
        return resize_plain(img, a.image_size)[None], 1
    tiles, _, rid = tile_image(img, tile=a.image_size, max_tiles=a.max_num_tiles)
    return tiles, rid


class ImageMedia:
    """An image part -> one `<|image|>` id + its tiles (the same in training and answering); picklable."""

    def __init__(self, vision_args: VisionArgs, token_id: int):
        self.vision_args, self.token_id = vision_args, token_id

    def decode(self, data: bytes, name: str, ext: str) -> Image.Image:
        return IMAGE.decode(data, name, ext)

    def plain(self, raw: dict, ext: str) -> Image.Image:
        return decode_member(raw, IMAGE)

    def splice(self, img: Image.Image) -> tuple[list[int], dict]:
        tiles, rid = image_tiles(img, self.vision_args)
        return [self.token_id], {"tiles": tiles, "ratio": rid, "max_tiles": self.vision_args.max_num_tiles}


def media(model, tok, opts, cfg=None) -> ImageMedia:
    return ImageMedia(model.image.vision_args, model.token_id("image"))


def turn(part, opts) -> list:
    """A caption request: the image, then the prompt (Llama 3.2 Vision's `<|image|>PROMPT`)."""
    return [part, Part("text", opts.prompt)]


def collate(items: list[dict]) -> dict:
    given = [p for it in items for p in it.get("image") or ()]
    if not given:
        return {}
    tiles = [[(p["tiles"], p["ratio"]) for p in it.get("image") or ()] for it in items]
    out = collate_images(tiles, given[0]["max_tiles"])
    return {k: out[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}


def image_batch(model, images: list[list[Image.Image]]) -> dict:
    """pixel_values / aspect_ratio_ids / aspect_ratio_mask for per-sample lists of images (tests, benchmarks)."""
    maker = media(model, None, None)
    return collate([{"image": [maker.splice(i)[1] for i in imgs]} for imgs in images])


def requests(model, tok, data: bytes, name: str, ext: str, opts):
    return plain_requests(model, tok, "image", [IMAGE.decode(data, name, ext)], name, opts), None


# --- evaluation and scale ---------------------------------------------------------------------------------------
def caption_metrics(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus BLEU (sacrebleu), CIDEr (pycocoevalcap) and exact match after normalisation."""
    import sacrebleu  # noqa: PLC0415 - evaluation only
    from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415 - evaluation only

    r_norm, h_norm = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
    bleu = sacrebleu.corpus_bleu(h_norm, [r_norm])
    exact = sum(r == h for r, h in zip(r_norm, h_norm)) / max(len(references), 1)
    gts = {i: [r] for i, r in enumerate(r_norm)}
    res = {i: [h or "<empty>"] for i, h in enumerate(h_norm)}
    cider = Cider().compute_score(gts, res)[0] if references else 0.0
    return {"bleu": bleu.score, "cider": float(cider), "exact_match": exact, "n": len(references)}


def shard_units(part: ImagePart) -> list:
    enc = part.vision_encoder
    return [*part.cross_attention_layers, *enc.transformer.layers, *enc.global_transformer.layers]


def plan_pieces(part: ImagePart, parts, batch: int, seq_len: int, dtype, cfg) -> PlanPieces:
    va, meta_dev = part.vision_args, {"device": "meta"}
    n = va.max_num_tiles  # every image at the most tiles: the plan is for the worst batch
    pixels = torch.empty(batch, 1, n, va.num_channels, va.image_size, va.image_size, dtype=dtype, **meta_dev)
    ratio_ids = torch.ones(batch, 1, dtype=torch.long, **meta_dev)
    ratio_mask = torch.ones(batch, 1, n, dtype=torch.long, **meta_dev)
    media = part.encode(pixels, ratio_ids, ratio_mask)  # [B, S, D]: every block's keys/values read it
    x = torch.empty(batch, seq_len, part.tower_args.dim, dtype=dtype, requires_grad=True, **meta_dev)
    bias = torch.empty(batch, 1, seq_len, media.shape[1], dtype=dtype, **meta_dev)
    row = torch.empty(batch, seq_len, 1, dtype=dtype, **meta_dev)
    blk = part.cross_attention_layers[0]
    enc = part.vision_encoder
    pieces = [
        Piece(
            "image encoder + projection",
            lambda: part.encode(pixels, ratio_ids, ratio_mask),
            units=(*enc.transformer.layers, *enc.global_transformer.layers),
        ),
        Piece(
            "cross-attention blocks",
            lambda: blk(x, media, bias, row),
            repeats=len(part.cross_attention_layers),
            shared=(media, bias, row),
            units=(blk,),
        ),
    ]
    lowest = 0 if part.learnable_embedding.weight.requires_grad else part.schedule[0]
    return PlanPieces(pieces, shared_bytes=tensor_bytes(media, bias, row), lowest_layer=lowest)


SPEC = Modality(
    name="image",
    format="mm_llama.image_adapter.v1",
    rows=8,  # <|image|> and 7 reserved: Llama 3.2 Vision's learnable rows
    part=PartHooks(
        Config=ImageConfig,
        build=build,
        meta=meta,
        from_meta=from_meta,
        row_table=lambda parts: (parts["image"].learnable_embedding, 0),
        inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
        prepare=prepare,
        blocks=lambda model, state: model.image.blocks(*state),
        step_state=slice_positions,
        encoders=lambda part: [part.vision_encoder],
    ),
    data=DataHooks(medium=IMAGE, media=media, turn=turn, collate=collate),
    inference=InferenceHooks(what="caption", requests=requests),
    evaluation=EvalHooks(metrics=caption_metrics),
    scale=ScaleHooks(shard_units=shard_units, plan_pieces=plan_pieces, file_options=("vision_init", "release")),
)
