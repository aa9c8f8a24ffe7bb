"""Image decoding (PIL) and transforms: any mode -> RGB, Llama 3.2 Vision tiling, plain resize.

Shape legend: N tiles, C channels, H/W pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .badsamples import SampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")

# CLIP normalisation, as the Llama 3.2 Vision image processor uses
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes -> RGB PIL image. Grayscale, palette, RGBA (composited on white), CMYK, 16-bit and EXIF-rotated
    images all come out as upright 8-bit RGB. Corrupt or truncated data raises SampleError('decode_image')."""
    if not data:
        raise SampleError("decode_image", f"{name}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise SampleError("decode_image", f"{name}: not an image (no image format recognised)") from None
    except Exception as e:
        raise SampleError("decode_image", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: rescale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x_CHW: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (x_CHW - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def resize_plain(img: Image.Image, size: int, *, normalise: bool = True) -> torch.Tensor:
    """Square resize for small encoders: [3, size, size]."""
    x = to_tensor(img.resize((size, size), Image.BICUBIC))
    return normalize(x) if normalise else x


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) canvases with rows*cols <= max_tiles, in Llama 3.2 Vision's order (by rows, then cols)."""
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def best_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the canvas the image fits best, as Llama 3.2 Vision chooses it: the smallest upscale when
    some canvas is larger than the image in both directions, else the largest downscale; ties -> smaller area."""
    options = supported_aspect_ratios(max_tiles)
    scales = []
    for rows, cols in options:
        scales.append(min(rows * tile / height, cols * tile / width))
    up = [s for s in scales if s >= 1.0]
    target = min(up) if up else max(scales)
    best = None
    for (rows, cols), s in zip(options, scales):
        if s == target and (best is None or rows * cols < best[0] * best[1]):
            best = (rows, cols)
    return best


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Size (h, w) that keeps the aspect ratio inside the canvas (the Llama 3.2 Vision processor's rule:
    each side first clipped to [tile, canvas], then the tighter scale wins)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_image(img: Image.Image, *, tile: int = 448, max_tiles: int = 4, normalise: bool = True, uint8: bool = False):
    """Llama 3.2 Vision tiling: resize without distortion into the best canvas, pad, cut into tiles.

    Returns (tiles [N, 3, tile, tile] with N = rows*cols, aspect_ratio (rows, cols), aspect_ratio_id 1-based).
    `uint8=True` returns raw 0..255 tiles (4x less to ship from DataLoader workers); `normalize_tiles` finishes
    them on the consumer side (e.g. on the GPU) with identical results."""
    w, h = img.size
    rows, cols = best_canvas(h, w, tile, max_tiles)
    canvas_h, canvas_w = rows * tile, cols * tile
    new_h, new_w = fit_to_canvas(h, w, canvas_h, canvas_w, tile)
    arr = torch.from_numpy(np.asarray(img.resize((new_w, new_h), Image.BILINEAR), dtype=np.uint8).copy())
    padded = torch.zeros(3, canvas_h, canvas_w, dtype=torch.uint8)  # pad with black, then normalise (as HF does)
    padded[:, :new_h, :new_w] = arr.permute(2, 0, 1)
    tiles = padded.unflatten(1, (rows, tile)).unflatten(3, (cols, tile))  # [3, rows, tile, cols, tile]
    tiles_NCHW = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if not uint8:
        tiles_NCHW = normalize_tiles(tiles_NCHW) if normalise else tiles_NCHW.float().div_(255.0)
    ratio_id = supported_aspect_ratios(max_tiles).index((rows, cols)) + 1
    return tiles_NCHW, (rows, cols), ratio_id


def normalize_tiles(tiles_uint8: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 tiles [..., 3, H, W] -> normalised float32 (rescale by 1/255, then (x - mean) / std)."""
    x = tiles_uint8.float().div_(255.0)
    shape = (3, 1, 1)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))
