"""Collation: padding, labels, placeholder expansion, image packing and cross-attention masks (vs HF Mllama)."""

import pytest
import torch

from mm_llama.data.collate import (
    IGNORE_INDEX,
    build_example,
    collate_images,
    collate_text,
    cross_attention_mask,
    expand_placeholders,
    image_token_spans,
    pack,
    segment_positions,
)

IMG = 99


def test_text_padding_and_labels():
    items = [build_example([1, 2, 3], [4, 5]), build_example([1], [6])]
    b = collate_text(items, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 6, 0, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX] * 3 + [4, 5], [IGNORE_INDEX, 6] + [IGNORE_INDEX] * 3]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_placeholder_expansion():
    assert expand_placeholders([1, 7, 2, 7, 3], 7, [3, 1]) == [1, 7, 7, 7, 2, 7, 3]
    with pytest.raises(ValueError, match="2 placeholder tokens for 1 clips"):
        expand_placeholders([7, 7], 7, [2])


SEQS = [
    [1, IMG, 5, 6, 7],  # one image
    [1, 5, 6],  # text only
    [1, IMG, IMG, 5, 6, IMG, 8, 9],  # consecutive images, then another
    [IMG, 3, IMG, 4, 5, 6],
]


def test_cross_attention_mask_matches_hf():
    proc = pytest.importorskip("transformers.models.mllama.processing_mllama")
    num_tiles = [[2], [], [1, 4, 3], [4, 1]]
    T = max(len(s) for s in SEQS)
    ours = cross_attention_mask(SEQS, IMG, num_tiles, max_tiles=4, length=T)
    sparse = [proc.get_cross_attention_token_mask(s, IMG) for s in SEQS]
    ref = proc.convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_num_tiles=4, length=T)
    assert ours.shape == ref.shape and torch.equal(ours, torch.from_numpy(ref))
    assert image_token_spans(SEQS[2], IMG) == [(1, 5), (2, 5), (5, 8)]  # consecutive images share a span


def test_collate_images_mixed_batch():
    t = lambda n: torch.randn(n, 3, 8, 8)  # noqa: E731
    out = collate_images([[(t(2), 2)], [], [(t(1), 1), (t(4), 6)]], max_tiles=4)
    assert out["pixel_values"].shape == (3, 2, 4, 3, 8, 8)
    assert out["aspect_ratio_ids"].tolist() == [[2, 0], [0, 0], [1, 6]]
    assert out["aspect_ratio_mask"][2].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert out["aspect_ratio_mask"][1].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert out["num_tiles"] == [[2], [], [1, 4]]
    assert out["pixel_values"][1].abs().sum() == 0
    with pytest.raises(ValueError, match="5 tiles > max_tiles 4"):
        collate_images([[(t(5), 1)]], max_tiles=4)


def test_mask_image_count_mismatch():
    with pytest.raises(ValueError, match="2 image tokens but 1 images"):
        cross_attention_mask([[IMG, IMG, 3]], IMG, [[1]], max_tiles=4)


def test_pack_first_fit_rows_segments_and_labels():
    items = [
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6], "image": ["a"]},
        {"input_ids": [1, 7, 8], "labels": [1, 7, 8]},
        {"input_ids": [1, 9, 9, 9, 9], "labels": [-100, 9, 9, 9, 9], "image": ["b", "c"]},
        {"input_ids": [1, 5], "labels": [-100, 5]},
    ]
    rows = pack(items, 8)  # longest first: [6 + 2], [5 + 3]
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4, 5, 6, 1, 5], [1, 7, 8, 1, 9, 9, 9, 9]]
    assert rows[1]["segment_ids"] == [0, 0, 0, 1, 1, 1, 1, 1]
    # a sample's first token is never a target (nothing of it comes before): ignored at every sample start
    assert rows[1]["labels"] == [-100, 7, 8, -100, 9, 9, 9, 9]
    assert rows[0]["image"] == ["a"] and rows[1]["image"] == ["b", "c"]
    with pytest.raises(ValueError, match="9 tokens does not fit a row of max_tokens 8"):
        pack([{"input_ids": list(range(9))}], 8)


def test_positions_restart_per_sample():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0]]


def test_packed_image_spans_stay_in_their_sample():
    V = 99
    ids = [V, 5, 6, V, 7, V, 8]  # sample 0: one image; sample 1: two images
    seg = [0, 0, 0, 1, 1, 1, 1]
    m = cross_attention_mask([ids], V, [[1, 1, 1]], 1, segments=[seg])[0, :, :, 0]
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
