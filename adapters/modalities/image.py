"""Image: the Llama 3.2 Vision-compatible adapter (ViT encoder + gated cross-attention before every 4th layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_llama.assets import resolve
from mm_llama.config import bounded, choice
from mm_llama.data.image import IMAGE_EXTS

from ..builders import VISION_PRESETS
from ..fusion import TOKEN_ROWS
from ..modality import AnswerOptions, Modality, require_member, text_target


@dataclass
class ImageConfig:
    vision: str = choice("debug", *VISION_PRESETS)  # image encoder preset (adapters/builders.py)
    vision_init: str | None = None  # safetensors of pretrained image-encoder weights (VisionEncoder names)
    # an HF Mllama folder (Llama 3.2 Vision): start from its released adapter (encoder, projection, cross-attention,
    # token rows; their shapes and placement come from the folder, `vision`/`xattn_*` are not used); the tower must
    # be the folder's text model (tower.path: the same folder)
    release: str | None = None
    freeze_vision: bool = False  # train only projection + cross-attention (+ token rows) on a pretrained encoder
    xattn_every: int = bounded(4, 1)  # cross-attention before every N-th tower layer (counted from the top)
    xattn_count: int | None = bounded(
        None, 1
    )  # only the top N of those (None: all): backward then stops at the lowest one
    train_token_rows: bool = True  # the new tokens' embedding rows; frozen, the tower below the first block is
    #                                forward-only


def release_adapter(tower, folder):
    """The image adapter of an HF Mllama folder on `tower` (its text model, loaded already), in fp32, frozen."""
    from pathlib import Path

    from mm_llama.llama.checkpoint import CheckpointError

    from ..checkpoint import is_mllama_folder, load_hf_mllama

    path = Path(resolve(folder))
    if not is_mllama_folder(path):
        raise CheckpointError(f"{path}: not an HF Mllama folder (config.json with model_type 'mllama')")
    dev = tower.tok_embeddings.weight.device
    return load_hf_mllama(path, torch.float32, "meta" if dev.type == "meta" else "cpu", tower=tower)


class ImageSamples:
    """raw sample -> prompt `[BOS] <|image|> PROMPT` + caption, the image's tiles and its cross-attention mask."""

    def __init__(self, vision_args, token_id: int, tok, prompt: str, max_text_tokens: int):
        self.vision_args, self.token_id, self.tok = vision_args, token_id, tok
        self.prompt, self.max_text = prompt, max_text_tokens

    def __call__(self, raw: dict) -> dict:
        from mm_llama.data.collate import build_example, cross_attention_mask
        from mm_llama.data.image import decode_image
        from mm_llama.generate import bos_prefix

        from ..inference import image_tiles

        target = text_target(self.tok, raw, self.max_text)
        ext = require_member(raw, IMAGE_EXTS, "image")
        tiles, rid = image_tiles(decode_image(raw[ext], raw["__key__"]), self.vision_args)
        item = build_example(bos_prefix(self.tok) + [self.token_id] + self.tok.encode(self.prompt), target)
        xmask = cross_attention_mask(
            [item["input_ids"]], self.token_id, [[tiles.shape[0]]], self.vision_args.max_num_tiles
        )
        return {**item, "image": (tiles, rid), "image_xmask": xmask[0]}


class Image(Modality):
    name = "image"
    exts = IMAGE_EXTS
    what = "caption"
    format = "mm_llama.image_adapter.v1"
    token_rows = TOKEN_ROWS["image"]
    inputs = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "image_state")
    Config = ImageConfig

    def build(self, tower, cfg, parts):
        from safetensors.torch import load_file

        from ..builders import attach_image_adapter

        c = cfg.image
        if c.release:
            model = release_adapter(tower, c.release)
            model.requires_grad_(True)
            model.freeze_tower()
        else:
            model = attach_image_adapter(tower, c.vision, every=c.xattn_every, n_xattn=c.xattn_count)
        model.learnable_embedding.requires_grad_(c.train_token_rows)
        if c.vision_init:
            model.vision_encoder.load_state_dict(load_file(resolve(c.vision_init)))
        if c.freeze_vision:
            model.vision_encoder.requires_grad_(False)
        return model

    def save(self, part, path):
        from ..checkpoint import save_adapter

        save_adapter(part, path)

    def load(self, tower, path, parts):
        from ..checkpoint import load_adapter

        return load_adapter(tower, path)

    def row_table(self, part):
        return part.learnable_embedding

    def prepare(self, model, input_ids, inputs):
        from ..xattn import media_attention_mask

        if inputs.get("image_state") is not None:
            return inputs["image_state"]
        if inputs.get("pixel_values") is None:
            return None
        im = model.image
        missing = [k for k in self.inputs[1:4] if inputs.get(k) is None]
        if missing:
            raise ValueError(f"pixel_values need {', '.join(missing)}")
        # the media tokens themselves: each block computes its keys/values in its own forward (FSDP2-shardable)
        media = im.encode_images(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
        media_kv = [media] * len(im.cross_attention_layers)
        T = input_ids.shape[1]
        dtype = model.tower.tok_embeddings.weight.dtype
        xmask = inputs["cross_attention_mask"][:, -T:]
        bias, row = media_attention_mask(xmask, im.vision_encoder.args.num_patches, dtype)
        return media_kv, bias, row

    def blocks(self, model, state):
        return model.image.blocks(*state)

    def shard_units(self, part):
        enc = part.vision_encoder
        return [*part.cross_attention_layers, *enc.transformer.layers, *enc.global_transformer.layers]

    def plan_pieces(self, part, batch, seq_len, dtype, cfg):
        from ..plan import Piece, PlanPieces, tensor_bytes

        va, meta = part.vision_encoder.args, {"device": "meta"}
        n = va.max_num_tiles  # every image at the most tiles: the plan is for the worst batch
        pixels = torch.empty(batch, 1, n, va.num_channels, va.image_size, va.image_size, dtype=dtype, **meta)
        ratio_ids = torch.ones(batch, 1, dtype=torch.long, **meta)
        ratio_mask = torch.ones(batch, 1, n, dtype=torch.long, **meta)
        media = part.encode_images(pixels, ratio_ids, ratio_mask)  # [B, S, D]: every block's keys/values read it
        x = torch.empty(batch, seq_len, part.tower.args.dim, dtype=dtype, requires_grad=True, **meta)
        bias = torch.empty(batch, 1, seq_len, media.shape[1], dtype=dtype, **meta)
        row = torch.empty(batch, seq_len, 1, dtype=dtype, **meta)
        blk = part.cross_attention_layers[0]
        enc = part.vision_encoder
        pieces = [
            Piece("image encoder + projection", lambda: part.encode_images(pixels, ratio_ids, ratio_mask),
                  units=(*enc.transformer.layers, *enc.global_transformer.layers)),
            Piece("cross-attention blocks", lambda: blk(x, media, bias, row), repeats=len(part.cross_attention_layers),
                  shared=(media, bias, row), units=(blk,)),
        ]  # fmt: skip
        lowest = 0 if part.learnable_embedding.weight.requires_grad else part.schedule[0]
        return PlanPieces(pieces, shared_bytes=tensor_bytes(media, bias, row), lowest_layer=lowest)

    def sample_maker(self, model, tok, cfg):
        return ImageSamples(model.image.vision_encoder.args, model.token_id("image"), tok, cfg.data.prompt,
                            cfg.data.max_text_tokens)  # fmt: skip

    def collate(self, items):
        from mm_llama.data.collate import collate_images

        n = items[0]["image_xmask"].shape[-1]
        out = collate_images([[it["image"]] for it in items], n)
        T = max(len(it["input_ids"]) for it in items)
        xmask = torch.zeros(len(items), T, 1, n, dtype=torch.long)
        for b, it in enumerate(items):
            xmask[b, : it["image_xmask"].shape[0]] = it["image_xmask"]
        return {k: out[k] for k in self.inputs[:3]} | {"cross_attention_mask": xmask}

    def answer(self, model, tok, name, data, opts: AnswerOptions):
        from mm_llama.data.image import decode_image

        from ..inference import caption

        img = decode_image(data, name)
        (text,) = caption(
            model.image,
            tok,
            [img],
            opts.prompt,
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            seed=opts.seed,
            on_token=opts.on_token,
        )
        return text, None

    def hypotheses(self, model, tok, samples, opts):
        from mm_llama.data.image import decode_image

        from ..inference import caption

        imgs = [decode_image(s[require_member(s, IMAGE_EXTS, "image")], s["__key__"]) for s in samples]
        return caption(model.image, tok, imgs, opts.prompt, max_new_tokens=opts.max_new_tokens)

    def metrics(self, references, hypotheses):
        """Corpus BLEU (sacrebleu), CIDEr (pycocoevalcap) and exact match after normalisation."""
        import sacrebleu
        from pycocoevalcap.cider.cider import Cider

        from mm_llama.text import normalize_text

        r_norm, h_norm = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
        bleu = sacrebleu.corpus_bleu(h_norm, [r_norm])
        exact = sum(r == h for r, h in zip(r_norm, h_norm)) / max(len(references), 1)
        gts = {i: [r] for i, r in enumerate(r_norm)}
        res = {i: [h or "<empty>"] for i, h in enumerate(h_norm)}
        cider = Cider().compute_score(gts, res)[0] if references else 0.0
        return {"bleu": bleu.score, "cider": float(cider), "exact_match": exact, "n": len(references)}


SPEC = Image()
