"""The demo's plain-classifier reference on the held-out clips (recipes.demo.classifier): which cell of each view
it reads, and the label it is scored against; the heads saved by the encoder stage load back."""

import json

import torch

from mm_llama.data.shards import read_index, read_samples
from mm_llama.data.writer import write_shards
from recipes.demo import scenes
from recipes.demo.classifier import (
    CellClassifier,
    classifier_video_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)


class CellLight(torch.nn.Module):
    """Reads a cell as occupied where it has bright pixels and names class `k` there; every EMPTY cell names class
    `decoy` with more confidence, so a scorer that picked the wrong cell would read the decoy."""

    def __init__(self, k: int, decoy: int):
        super().__init__()
        self.k, self.decoy = k, decoy

    def forward(self, px):
        B = px.shape[0]
        cells = px[:, 0].reshape(B, 2, 28, 2, 28).permute(0, 1, 3, 2, 4).reshape(B, 4, -1)
        occupied = cells.max(-1).values > 0.0  # normalised: the black background is negative
        logits = torch.zeros(B, 4, 11)
        logits[..., 10] = torch.where(occupied, -5.0, 5.0)
        logits[..., self.k] = torch.where(occupied, 3.0, 0.0)
        logits[..., self.decoy] = torch.where(occupied, 0.0, 10.0)
        return logits, torch.zeros(B, 4, 4)


def test_classifier_reads_the_occupied_cell_of_each_clip(tmp_path):
    write_shards(scenes.motion_records("test", 12, 0), tmp_path / "v", progress=False)
    samples = read_samples(read_index(tmp_path / "v/index.json")[0])
    labels = [json.loads(s["json"])["label"] for s in samples]
    k = labels[0]
    decoy = next(c for c in range(10) if c not in labels) if len(set(labels)) < 10 else (k + 1) % 10
    res = classifier_video_accuracy(CellLight(k, decoy), samples)
    want = sum(lab == k for lab in labels) / len(labels)
    assert res == {"first": want, "last": want, "both": want, "n": 12} and want > 0


def test_encoder_stage_heads_load_back(tmp_path):
    assert load_classifier(tmp_path) is None  # runs from before the heads were kept: no reference, no error
    torch.manual_seed(0)
    model = CellClassifier("demo").eval()
    (tmp_path / "encoder").mkdir()
    save_classifier(model, tmp_path / "encoder")
    back = load_classifier(tmp_path)
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(px), back(px)))


def test_trained_classifier_comes_back_in_the_plain_layout(tmp_path):
    """The encoder stage trains with channels-last convolutions and the fused AdamW; the model it returns has plain
    contiguous weights, learns (the loss falls over a few steps) and saves and loads back to the same outputs."""
    model, losses = train_classifier("demo", 6, 8, 0, bf16=False, log_every=0)
    assert all(p.is_contiguous() for p in model.parameters())
    assert losses[-1] < losses[0]
    (tmp_path / "encoder").mkdir()
    save_classifier(model, tmp_path / "encoder")
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(px), load_classifier(tmp_path)(px)))
