"""Make the tiny committed test shards in tests/assets/shards/ (run from the repo root):

    python -m tests.assets.make_assets

Synthetic but real-format media: PNG/JPEG/WebP images in odd modes (grayscale, palette, RGBA, CMYK, 16-bit,
EXIF-rotated), FLAC/WAV/MP3 audio (8/16/24-bit, stereo, 8-48 kHz), H.264 MP4 clips of a moving square. Shards
are written through mm_llama's own writer (webdataset's ShardWriter, fixed mtime), so re-running this script
reproduces them byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

from mm_llama.data.writer import manifest_samples, write_shards

OUT = Path(__file__).resolve().parent / "shards"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def image_files(tmp: Path) -> list[dict]:
    recs = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        w, h = 64 + 16 * i, 48 + 8 * i
        img = Image.new("RGB", (w, h), (255, 255, 255))
        img.paste(Image.new("RGB", (w // 2, h // 2), rgb), (w // 4, h // 4))
        variants = [
            ("png", img, {}),
            ("jpg", img.convert("CMYK"), {"quality": 90}),
            ("png", img.convert("P", palette=Image.ADAPTIVE, colors=8), {}),
            ("webp", img.convert("RGBA"), {"lossless": True}),
        ]
        ext, im, kw = variants[i % len(variants)]
        p = tmp / f"{name}-square.{ext}"
        im.save(p, **kw)
        recs.append({"image": str(p), "text": f"a {name} square on a white background", "label": name})
    # 16-bit grayscale and an EXIF-rotated JPEG (stored sideways, orientation tag 6 = rotate 90 CW to display)
    g16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(g16).save(tmp / "gradient16.png")
    recs.append({"image": str(tmp / "gradient16.png"), "text": "a smooth gray gradient", "label": "gradient"})
    tall = Image.new("RGB", (30, 60), (255, 255, 255))
    tall.paste(Image.new("RGB", (30, 20), (220, 30, 30)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.rotate(90, expand=True).save(tmp / "rotated.jpg", exif=exif, quality=95)
    recs.append({"image": str(tmp / "rotated.jpg"), "text": "a tall image with a red top", "label": "rotated"})
    return recs


def tone(freq: float, seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * math.pi * freq * t) * np.minimum(1.0, 20 * t) * np.minimum(1.0, 20 * (seconds - t))
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def audio_files(tmp: Path) -> list[dict]:
    recs = []
    specs = [
        ("low", 220.0, 0.6, 16000, 1, "flac", "PCM_16"),
        ("middle", 440.0, 0.45, 44100, 2, "wav", "PCM_24"),
        ("high", 880.0, 0.35, 8000, 1, "wav", "PCM_U8"),
        ("very high", 1760.0, 0.5, 48000, 2, "flac", "PCM_24"),
    ]
    for name, f, sec, sr, ch, ext, subtype in specs:
        p = tmp / f"tone-{name.replace(' ', '_')}.{ext}"
        sf.write(p, tone(f, sec, sr, ch), sr, subtype=subtype, format=ext.upper())
        recs.append({"audio": str(p), "text": f"a {name} tone", "label": name})
    # one mp3 through PyAV
    p = tmp / "tone-mp3.mp3"
    with av.open(str(p), "w") as c:
        s = c.add_stream("mp3", rate=22050)
        s.layout = "mono"
        x = (tone(330.0, 0.5, 22050) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
        frame.sample_rate = 22050
        for pkt in s.encode(frame):
            c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    recs.append({"audio": str(p), "text": "an mp3 tone", "label": "mp3"})
    return recs


def video_files(tmp: Path) -> list[dict]:
    recs = []
    for direction in ("right", "left", "down"):
        p = tmp / f"square-{direction}.mp4"
        with av.open(str(p), "w") as c:
            s = c.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            s.options = {"crf": "30", "preset": "ultrafast", "g": "4"}
            for k in range(12):
                img = np.full((48, 64, 3), 255, np.uint8)
                pos = 4 + 4 * k
                if direction == "right":
                    img[18:30, pos : pos + 12] = (40, 60, 220)
                elif direction == "left":
                    img[18:30, 56 - pos : 68 - pos] = (40, 60, 220)
                else:
                    img[pos * 48 // 64 : pos * 48 // 64 + 10, 26:38] = (40, 60, 220)
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode(None):
                c.mux(pkt)
        recs.append({"video": str(p), "text": f"a blue square moves {direction}", "label": direction})
    return recs


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, recs, maxcount in (
            ("image", image_files(tmp), 3),
            ("audio", audio_files(tmp), 2),
            ("video", video_files(tmp), 2),
        ):
            manifest = tmp / f"{name}.jsonl"
            manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))

            rep = write_shards(manifest_samples(manifest), OUT / name, maxcount=maxcount, progress=False, replace=True)
            print(f"{name}: {rep.written} samples in {len(rep.shards)} shards, skipped {rep.skipped}")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1024:.0f} KiB in {OUT}")


if __name__ == "__main__":
    main()
