"""The demo's image encoder pretrained as a plain classifier (the paper starts from a pretrained image encoder):
the demo ViT with two linear heads shared by all cells, trained on fresh training-split composites, and its reading
of the held-out composites and clips (the captioners read the same frozen encoder, so this is their ceiling)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mm_llama.adapters.image import get_vision_preset
from mm_llama.adapters.modality import require_member
from mm_llama.adapters.vision import VisionEncoder
from mm_llama.data.image import decode_image, normalize_tiles, resize_plain
from mm_llama.data.media import VIDEO
from mm_llama.data.video import decode_video

from . import scenes


class CellClassifier(torch.nn.Module):
    """The demo ViT + two linear heads shared by all cells: the item in the cell (10 classes + empty) and the cell
    itself. The demo preset has one token per 28 px cell; heads shared across cells make every token say
    both what and where, which is what the captioner's cross-attention reads."""

    def __init__(self, vision="demo"):
        super().__init__()
        self.encoder = VisionEncoder(get_vision_preset(vision) if isinstance(vision, str) else vision)
        a = self.encoder.args
        self.grid = a.image_size // a.patch_size
        self.head = torch.nn.Linear(a.output_dim * (self.grid // 2) ** 2, 11)
        self.where = torch.nn.Linear(a.output_dim * (self.grid // 2) ** 2, 4)

    def forward(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (item logits [B, 4 cells, 11], cell logits [B, 4 cells, 4])."""
        B = pixels_BCHW.shape[0]
        n = self.encoder.args.max_num_tiles
        px = torch.zeros(B, 1, n, *pixels_BCHW.shape[1:])
        px[:, 0, 0] = pixels_BCHW
        ar_mask = torch.zeros(B, 1, n, dtype=torch.long)
        ar_mask[:, :, 0] = 1
        feats = self.encoder(px, torch.ones(B, 1, dtype=torch.long), ar_mask)[:, 0, 0, 1:]  # [B, g*g, D]
        h = self.grid // 2
        cells = feats.reshape(B, 2, h, 2, h, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, 4, -1)
        return self.head(cells), self.where(cells)


def _augment_items(images, rng, shift: int):
    """Per item: a horizontal flip half the time (garments read the same mirrored) and a shift of up to `shift` px
    each way inside its own 28 px cell (zero fill), so the cell it is in, the caption's layout, stays the same."""
    out = images.copy()
    flip = rng.random(len(out)) < 0.5
    out[flip] = out[flip, :, ::-1]
    if shift:
        s = out.shape[-1]
        pad = np.pad(out, ((0, 0), (shift, shift), (shift, shift)))
        dy, dx = rng.integers(0, 2 * shift + 1, size=(2, len(out)))
        out = np.stack([p[y : y + s, x : x + s] for p, y, x in zip(pad, dy, dx)])
    return out


def _composite_batch(images, labels, rng, n, shift: int = -1):
    """n training composites -> (pixels, per-cell labels, 10 = empty); shift >= 0 augments each item
    (`_augment_items`), -1 keeps them as they are."""
    px, ys = [], []
    for _ in range(n):
        where = scenes.sample_layout(rng, len(images))
        if shift >= 0:
            cells = list(where)
            items = _augment_items(images[[where[c] for c in cells]], rng, shift)
            canvas = scenes.composite_image(items, {c: i for i, c in enumerate(cells)})
        else:
            canvas = scenes.composite_image(images, where)
        px.append(resize_plain(Image.fromarray(canvas).convert("RGB"), canvas.shape[0]))
        ys.append([int(labels[where[c]]) if c in where else 10 for c in range(4)])
    return torch.stack(px), torch.tensor(ys)


def train_classifier(
    vision,
    steps: int,
    batch: int,
    seed: int,
    bf16: bool,
    log_every: int = 200,
    shift: int = -1,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.0,
):
    """The encoder pretraining: the CellClassifier on fresh training-split composites each step (AdamW, one-cycle
    rate peaking at `lr`); shift >= 0 flips and shifts the items (`_augment_items`); `label_smoothing` on the item
    loss. -> (model, per-step losses)."""

    torch.manual_seed(seed)
    images, labels = scenes.load_fashion_mnist("train")
    rng = np.random.default_rng(seed + 10)
    # Channels-last convolutions and the fused AdamW: about 30% less per step on a 2-core AMD EPYC (bf16),
    # measured with the encoder stage's batch; the weights go back to the plain layout before they are returned.
    # (The pixels need no layout change: CellClassifier.forward copies them into its own tile tensor.)
    model = CellClassifier(vision).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.02)
    losses = []
    model.train()
    for step in range(steps):
        px, ys = _composite_batch(images, labels, rng, batch, shift)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, where = model(px)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, 11), ys.reshape(-1), label_smoothing=label_smoothing
        )
        loss = loss + torch.nn.functional.cross_entropy(where.float().reshape(-1, 4), torch.arange(4).repeat(len(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0:
            print(f"  encoder step {step}/{steps}: loss {losses[-1]:.3f}", flush=True)
    return model.to(memory_format=torch.contiguous_format).eval(), losses


def classifier_accuracy(model: CellClassifier, samples: list[dict]) -> tuple[float, int]:
    """Items the classifier names right in their cells on held-out composites -> (fraction, items)."""
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            chunk = samples[i : i + 64]
            px = torch.stack([resize_plain(decode_image(s["png"]), 56) for s in chunk])
            pred = model(px)[0].argmax(-1)
            for b, s in enumerate(chunk):
                for c, lab in json.loads(s["json"])["layout"].items():
                    correct += int(pred[b, int(c)] == lab)
                    total += 1
    return correct / max(total, 1), total


def save_classifier(model: CellClassifier, out: Path) -> None:
    """OUT/encoder.safetensors (what the adapters read) and OUT/heads.safetensors (the classifier's own heads, so its
    reading of other held-out sets, the video clips, can be scored later: `load_classifier`)."""
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(out / "encoder.safetensors"))
    heads = {f"{n}.{k}": v.contiguous() for n in ("head", "where") for k, v in getattr(model, n).state_dict().items()}
    save_file(heads, str(out / "heads.safetensors"))


def load_classifier(run: Path) -> CellClassifier | None:
    """The encoder stage's classifier (encoder + heads) of a run, or None where its heads were not kept (runs made
    before the heads were saved)."""
    enc, heads = run / "encoder/encoder.safetensors", run / "encoder/heads.safetensors"
    if not (enc.exists() and heads.exists()):
        return None
    model = CellClassifier("demo")
    model.encoder.load_state_dict(load_file(str(enc)))
    hw = load_file(str(heads))
    for n in ("head", "where"):
        getattr(model, n).load_state_dict({k.split(".", 1)[1]: v for k, v in hw.items() if k.startswith(n + ".")})
    return model.eval()


def classifier_video_hits(model: CellClassifier, samples: list[dict], frames: int = 8) -> dict[str, list[bool]]:
    """The plain classifier on the held-out clips: per clip, whether it names the item right in the cell it reads as
    occupied (the lowest "empty" probability), from the clip's first frame (start cell), its last frame (end cell)
    and both together (log-probabilities summed): the ceiling the video captioner reads through the same frozen
    encoder. -> {"first", "last", "both"}: one bool per clip."""
    hits = {"first": [], "last": [], "both": []}
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            chunk = samples[i : i + 64]
            clips = [decode_video(s[require_member(s, VIDEO)], s["__key__"], num_frames=frames, size=56) for s in chunk]
            px = normalize_tiles(torch.stack([c[k] for c in clips for k in (0, frames - 1)]))
            logp = model(px)[0].float().log_softmax(-1).reshape(len(chunk), 2, 4, 11)
            cell = logp[..., 10].argmin(-1)  # [B, 2]: the occupied cell of each view
            item = logp[..., :10].gather(2, cell[..., None, None].expand(-1, -1, 1, 10)).squeeze(2)  # [B, 2, 10]
            labels = torch.tensor([json.loads(s["json"])["label"] for s in chunk])
            for name, scores in (("first", item[:, 0]), ("last", item[:, 1]), ("both", item.sum(1))):
                hits[name] += (scores.argmax(-1) == labels).tolist()
    return hits


def hit_fractions(hits: dict[str, list[bool]]) -> dict:
    """{"first", "last", "both"}: one bool per clip -> the same keys as fractions of the clips, and "n"."""
    n = len(hits["both"])
    return {**{k: sum(v) / max(n, 1) for k, v in hits.items()}, "n": n}


def classifier_video_accuracy(model: CellClassifier, samples: list[dict], frames: int = 8) -> dict:
    """`classifier_video_hits` as fractions of the clips -> {"first", "last", "both", "n"}."""
    return hit_fractions(classifier_video_hits(model, samples, frames))
