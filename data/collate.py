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


def segment_bounds(segments: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal segment ids that is not padding (-1), in order."""
    out, start = [], 0
    for i in range(1, len(segments) + 1):
        if i == len(segments) or segments[i] != segments[start]:
            if segments[start] >= 0:
                out.append((start, i))
            start = i
    return out


def packed_image_spans(ids: Sequence[int], image_token_id: int, segments: Sequence[int]) -> list[tuple[int, int]]:
    """Image spans of a packed row: each sample's own (Llama 3.2 Vision's rule within the sample; a lone image
    is seen to the sample's end), in order."""
    spans = []
    for a, b in segment_bounds(segments):
        spans += [(a + s, b if e == -1 else a + e) for s, e in image_token_spans(ids[a:b], image_token_id)]
    return spans


def cross_attention_mask(
    input_ids: Sequence[Sequence[int]],
    image_token_id: int,
    num_tiles: Sequence[Sequence[int]],
    max_tiles: int,
    length: int | None = None,
    segments: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """[B, T, I, N] int64 (1 = this token may attend to that image's tile), as the HF Mllama processor builds it.
    `segments` (packed rows: each position's sample, -1 padding): every sample sees only its own images."""
    B = len(input_ids)
    T = length if length is not None else max((len(s) for s in input_ids), default=0)
    I = max((len(n) for n in num_tiles), default=0)  # noqa: E741
    out = torch.zeros(B, T, max(I, 1), max_tiles, dtype=torch.long)
    for b, ids in enumerate(input_ids):
        if segments is None:
            spans = image_token_spans(ids, image_token_id)
        else:
            spans = packed_image_spans(ids, image_token_id, segments[b])
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


def pack(items: Sequence[dict], max_tokens: int) -> list[dict]:
    """Items -> as few rows of at most `max_tokens` tokens as first-fit (longest first) allows. A row holds its
    samples one after another: `input_ids`, `labels` (each sample's first label ignored: nothing before it in the
    sample predicts it), `segment_ids` (the sample's index in the row) and every other key's lists concatenated in
    order (each modality's payloads). An item longer than `max_tokens` raises ValueError."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        if n > max_tokens:
            raise ValueError(f"an item of {n} tokens does not fit a row of max_tokens {max_tokens}")
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(max_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    out = []
    for members in rows:
        row: dict = {"input_ids": [], "labels": [], "segment_ids": []}
        for s, i in enumerate(sorted(members)):
            it = items[i]
            labels = list(it.get("labels", it["input_ids"]))
            row["input_ids"] += it["input_ids"]
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["segment_ids"] += [s] * len(it["input_ids"])
            for k, v in it.items():
                if k not in ("input_ids", "labels"):
                    row.setdefault(k, []).extend(v)
        out.append(row)
    return out


def segment_positions(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """RoPE positions restarting at 0 at each sample of a packed row (padding continues its run)."""
    B, T = segment_ids_BT.shape
    idx = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    starts = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    starts[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - first
