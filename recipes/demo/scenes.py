"""The demo's world, from real offline data: Fashion-MNIST items laid out in a 2x2 grid (composites) and items
moving across it (clips). Every builder yields `write_shards` records (media as `(name, bytes)`, exact captions as
`text`), and every caption grammar has a parser so evaluation can score generated text field by field.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
# Fashion-MNIST label order; names as they read in a caption
FASHION_CLASSES = [
    "T-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]  # 2x2 grid cells in reading order
CELL = 28


class CorpusError(RuntimeError):
    pass


def need(path: Path, package: str) -> Path:
    if not path.exists():
        raise CorpusError(f"{path} not found: install the Debian package {package} (make demo does, as root)")
    return path


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def load_fashion_mnist(split: str, root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """split train|test -> (uint8 images [N, 28, 28], int64 labels [N]) from the IDX files."""
    stem = {"train": "train", "test": "t10k"}[split]
    imgs = need(root / f"{stem}-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    labs = need(root / f"{stem}-labels-idx1-ubyte.gz", "dataset-fashion-mnist")
    with gzip.open(imgs) as f:
        raw = f.read()
    magic, n, h, w = np.frombuffer(raw[:16], ">u4")
    if magic != 2051:
        raise CorpusError(f"{imgs}: not an IDX image file (magic {magic})")
    images = np.frombuffer(raw[16:], np.uint8).reshape(int(n), int(h), int(w))
    with gzip.open(labs) as f:
        raw = f.read()
    if np.frombuffer(raw[:4], ">u4")[0] != 2049:
        raise CorpusError(f"{labs}: not an IDX label file")
    labels = np.frombuffer(raw[8:], np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise CorpusError(f"{imgs}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _item(label: int) -> str:
    name = FASHION_CLASSES[label]
    return ("an " if name[0] in "aeiou" else "a ") + name


def composite_caption(layout: dict[int, int]) -> str:
    """{cell: label} -> caption, the place named before the item (so a captioner knows where to look before it names
    what it sees). Two items in a row: "at the top, a X to the left of a Y"; in a column: "at the top left a X and
    below it a Y"; otherwise every item with its cell, in reading order. A column caption starts as the diagonal one
    does and parts from it after the first item, where "below it" vs "at the bottom left/right" is a look at one cell:
    the earlier column template ("on the left, a X above a Y") made the captioner choose column vs diagonal at the
    first word, before it had looked anywhere, and every layout error of the demo was that choice (issue 21)."""
    cells = sorted(layout)
    if len(cells) == 2:
        a, b = cells
        if a // 2 == b // 2:
            return f"at the {'top' if a < 2 else 'bottom'}, {_item(layout[a])} to the left of {_item(layout[b])}"
        if a % 2 == b % 2:
            return f"at the {POSITIONS[a]} {_item(layout[a])} and below it {_item(layout[b])}"
    parts = [f"at the {POSITIONS[c]} {_item(layout[c])}" for c in cells]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_ITEM_RE = "|".join(re.escape(n) for n in sorted(FASHION_CLASSES, key=len, reverse=True))
_ITEM = rf"an? ({_ITEM_RE})"
_ROW = re.compile(rf"^at the (top|bottom), {_ITEM} to the left of {_ITEM}$")
_COL = re.compile(rf"^at the top (left|right) {_ITEM} and below it {_ITEM}$")
_PART = re.compile(rf"^at the ({'|'.join(POSITIONS)}) {_ITEM}$")


def parse_composite_caption(text: str) -> dict[int, int] | None:
    """Inverse of composite_caption; None when the text does not follow the grammar (or names a cell twice)."""
    text = text.strip().rstrip(".").strip()
    lab = FASHION_CLASSES.index
    if m := _ROW.match(text):
        r = 0 if m[1] == "top" else 2
        return {r: lab(m[2]), r + 1: lab(m[3])}
    if m := _COL.match(text):
        c = 0 if m[1] == "left" else 1
        return {c: lab(m[2]), c + 2: lab(m[3])}
    parts = re.split(r", | and ", text)
    out: dict[int, int] = {}
    for p in parts:
        m = _PART.match(p)
        if m is None or POSITIONS.index(m[1]) in out:
            return None
        out[POSITIONS.index(m[1])] = lab(m[2])
    return out if len(out) >= 2 else None


def composite_image(images: np.ndarray, layout: dict[int, int]) -> np.ndarray:
    """{cell: image index} -> uint8 [56, 56] canvas."""
    canvas = np.zeros((2 * CELL, 2 * CELL), np.uint8)
    for cell, idx in layout.items():
        r, c = divmod(cell, 2)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = images[idx]
    return canvas


def sample_layout(rng: np.random.Generator, n_images: int, two_item_share: float | None = None) -> dict[int, int]:
    """2-4 distinct cells, each with a random image index. The number of items is uniform, or with
    `two_item_share` that share of layouts has two items (the row / column / diagonal templates) and the rest three
    or four, evenly."""
    if two_item_share is None:
        k = int(rng.integers(2, 5))
    else:
        rest = (1.0 - two_item_share) / 2
        k = int(rng.choice([2, 3, 4], p=[two_item_share, rest, rest]))
    cells = sorted(rng.choice(4, size=k, replace=False).tolist())
    return {c: int(rng.integers(n_images)) for c in cells}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def draw_composite(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, two_item_share: float | None = None
) -> tuple[dict[int, int], bytes]:
    """One composite drawn from `images`: ({cell: label}, its PNG bytes); `two_item_share`: see `sample_layout`."""
    where = sample_layout(rng, len(images), two_item_share)
    return {c: int(labels[j]) for c, j in where.items()}, _png(composite_image(images, where))


def composite_records(split: str, n: int, seed: int, two_item_share: float | None = None) -> Iterator[dict]:
    """Composites built only from `split`'s images; json carries {cell: label} for evaluation; `two_item_share`:
    see `sample_layout` (None: 2, 3 and 4 items equally often)."""
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    for i in range(n):
        layout, png = draw_composite(rng, images, labels, two_item_share)
        meta = {"layout": {str(c): v for c, v in layout.items()}}
        yield {"image": (f"{split}{i:06d}.png", png), "text": composite_caption(layout), "json": meta}


# ----------------------------------------------------------------------------------------------
# moving-item clips

DIRECTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}
_MOVE = re.compile(rf"^{_ITEM} moves ({'|'.join(DIRECTIONS)})$")


def motion_caption(label: int, direction: str) -> str:
    return f"{_item(label)} moves {direction}"


def parse_motion_caption(text: str) -> tuple[int, str] | None:
    m = _MOVE.match(text.strip().rstrip(".").strip())
    return (FASHION_CLASSES.index(m[1]), m[2]) if m else None


def motion_frames(item: np.ndarray, direction: str, offset: int, frames: int = 8, size: int = 56) -> np.ndarray:
    """uint8 [frames, size, size]: the item steps from one cell of the 2x2 grid to the neighbouring one along
    `direction` (first half of the clip in the start cell, second half in the end cell; cell-aligned, as the demo
    encoder sees one token per cell); `offset` is its fixed position on the other axis. Start and end are mirror
    images of each other, so only the frame order tells the direction."""
    dx, dy = DIRECTIONS[direction]
    span = size - item.shape[0]
    out = np.zeros((frames, size, size), np.uint8)
    for t in range(frames):
        p = span if 2 * t >= frames else 0
        x = (p if dx > 0 else span - p) if dx else offset
        y = (p if dy > 0 else span - p) if dy else offset
        out[t, y : y + item.shape[0], x : x + item.shape[1]] = item
    return out


def encode_mp4(frames_THW: np.ndarray, fps: int = 8) -> bytes:
    """Grey frames -> H.264 MP4 bytes (PyAV; near-lossless CRF)."""

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        # one encoder thread: x264's own thread pool costs more than it saves on 8 tiny frames (3x slower per clip),
        # and the bytes are the same
        s = out.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "veryfast", "threads": "1"})
        s.height, s.width = frames_THW.shape[1:]
        s.pix_fmt = "yuv420p"
        for f in frames_THW:
            rgb = np.repeat(f[..., None], 3, axis=-1)
            for packet in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return buf.getvalue()


def draw_clip(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, frames: int = 8):
    """One moving-item clip drawn from `images`: (its item's label, its direction, its MP4 bytes)."""
    names = list(DIRECTIONS)
    j, d = int(rng.integers(len(images))), names[int(rng.integers(len(names)))]
    clip = motion_frames(images[j], d, CELL * int(rng.integers(2)), frames)
    return int(labels[j]), d, encode_mp4(clip)


def motion_records(split: str, n: int, seed: int, frames: int = 8) -> Iterator[dict]:
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    for i in range(n):
        label, d, mp4 = draw_clip(rng, images, labels, frames)
        yield {
            "video": (f"{split}{i:06d}.mp4", mp4),
            "text": motion_caption(label, d),
            "json": {"label": label, "direction": d},
        }
