"""Batch assembly: text padding, label masking, speech placeholder expansion, image tile padding and the
cross-attention masks for batches mixing samples with zero, one or several images.

Shape legend: B batch, T tokens, I images per sample (padded), N tiles per image (padded), C/H/W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, *, left: bool = False) -> torch.Tensor:
    T = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            if left:
                out[b, T - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            else:
                out[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def build_example(prompt_ids: Sequence[int], target_ids: Sequence[int]) -> dict:
    """input_ids = prompt + target; labels ignore the prompt (and any media placeholders inside it)."""
    return {
        "input_ids": list(prompt_ids) + list(target_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(target_ids),
    }


def expand_placeholders(ids: Sequence[int], placeholder_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the k-th occurrence of `placeholder_id` by counts[k] copies (one per speech adapter output frame)."""
    where = [i for i, t in enumerate(ids) if t == placeholder_id]
    if len(where) != len(counts):
        raise ValueError(f"{len(where)} placeholder tokens for {len(counts)} clips")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == placeholder_id:
            out += [placeholder_id] * int(counts[k])
            k += 1
        else:
            out.append(t)
    return out


def collate_text(items: Sequence[dict], pad_id: int) -> dict:
    """{'input_ids', 'labels'} lists -> right-padded tensors + attention_mask (labels padded with IGNORE_INDEX)."""
    ids = [it["input_ids"] for it in items]
    labels = [it.get("labels", it["input_ids"]) for it in items]
    input_ids = pad_sequences(ids, pad_id)
    lens = torch.tensor([len(s) for s in ids])
    return {
        "input_ids": input_ids,
        "labels": pad_sequences(labels, IGNORE_INDEX),
        "attention_mask": (torch.arange(input_ids.shape[1])[None] < lens[:, None]).long(),
    }


def image_token_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image (in order): the [start, end) token span that may attend to it. An image is visible from its
    `<|image|>` token to the next image token; consecutive image tokens all see the text after the last of
    them; the last image sees everything to the end (Llama 3.2 Vision's rule). end == -1: to the padded end."""
    locs = [i for i, t in enumerate(ids) if t == image_token_id]
    if not locs:
        return []
    if len(locs) == 1:  # HF marks a lone image visible through the padded length too
        return [(locs[0], -1)]
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], len(ids)]]
    last_end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # directly followed by another image token
            span[1] = last_end
        last_end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(
    input_ids: Sequence[Sequence[int]],
    image_token_id: int,
    num_tiles: Sequence[Sequence[int]],
    max_tiles: int,
    length: int | None = None,
) -> torch.Tensor:
    """[B, T, I, N] int64 (1 = this token may attend to that image's tile), as the HF Mllama processor builds it."""
    B = len(input_ids)
    T = length if length is not None else max((len(s) for s in input_ids), default=0)
    I = max((len(n) for n in num_tiles), default=0)  # noqa: E741
    out = torch.zeros(B, T, max(I, 1), max_tiles, dtype=torch.long)
    for b, ids in enumerate(input_ids):
        spans = image_token_spans(ids, image_token_id)
        if len(spans) != len(num_tiles[b]):
            raise ValueError(f"sample {b}: {len(spans)} image tokens but {len(num_tiles[b])} images")
        for i, ((start, end), n) in enumerate(zip(spans, num_tiles[b])):
            out[b, start : (T if end == -1 else min(end, T)), i, :n] = 1
    return out


def collate_images(images: Sequence[Sequence[tuple[torch.Tensor, int]]], max_tiles: int) -> dict:
    """Per sample a list of (tiles [n, C, H, W], aspect_ratio_id) -> padded pixel_values [B, I, N, C, H, W],
    aspect_ratio_ids [B, I] (0 = padding image), aspect_ratio_mask [B, I, N], num_tiles (lists).
    Samples without images get all-zero entries (I is at least 1)."""
    B = len(images)
    I = max((len(x) for x in images), default=0)  # noqa: E741
    shape = next((t.shape[1:] for x in images for t, _ in x), (3, 1, 1))
    pixel_values = torch.zeros(B, max(I, 1), max_tiles, *shape)
    ratio_ids = torch.zeros(B, max(I, 1), dtype=torch.long)
    ratio_mask = torch.zeros(B, max(I, 1), max_tiles, dtype=torch.long)
    ratio_mask[:, :, 0] = 1  # as the HF processor does: tile 0 is never masked, even for a padding image
    num_tiles = []
    for b, sample in enumerate(images):
        nt = []
        for i, (tiles, rid) in enumerate(sample):
            n = tiles.shape[0]
            if n > max_tiles:
                raise ValueError(f"sample {b} image {i}: {n} tiles > max_tiles {max_tiles}")
            pixel_values[b, i, :n] = tiles
            ratio_ids[b, i] = rid
            ratio_mask[b, i, :n] = 1
            nt.append(n)
        num_tiles.append(nt)
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ratio_ids,
        "aspect_ratio_mask": ratio_mask,
        "num_tiles": num_tiles,
    }
