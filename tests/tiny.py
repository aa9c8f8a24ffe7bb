"""The tiny components tests build (conftest.py serves them as fixtures; call these for a fresh, mutable copy):
a seeded debug tower, the three parts with their gates open, a character tokenizer, synthetic media, a tiny
random transformers Mllama folder."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import torch
from PIL import Image

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import save_part
from mm_llama.adapters.image import build_image_part
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.adapters.video import AggregatorArgs, VideoPart
from mm_llama.data.image import normalize
from mm_llama.llama import Transformer, get_preset


def tower(n_layers: int = 16, seed: int = 0, **kw) -> Transformer:
    """The debug preset (d 64, vocabulary 512), seeded, frozen."""
    t = Transformer(get_preset("debug").replace(n_layers=n_layers, **kw))
    t.init_weights(std=0.05, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(False).eval()


def open_gates(blocks, value: float = 0.7) -> None:
    """Fresh blocks are the identity (gates 0): open them so the output depends on the media."""
    with torch.no_grad():
        for blk in blocks:
            blk.gate_attn.fill_(value)
            blk.gate_ffwd.fill_(value)


def parts(t: Transformer, seed: int = 0, gates: float = 0.7) -> dict:
    """image (debug encoder, up to 4 tiles), video (merge 4) and speech (debug Conformer) parts for `t`."""
    torch.manual_seed(seed)
    image = build_image_part(t, "debug")
    video = VideoPart.on_image(image, AggregatorArgs(merge=4, heads=4))
    speech = build_speech_part(t, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"])
    open_gates(image.cross_attention_layers, gates)
    open_gates(video.video_cross_attention_layers, gates)
    return {"image": image.eval(), "video": video.eval(), "speech": speech.eval()}


def model(kinds=("image", "video", "speech"), n_layers: int = 16, seed: int = 0) -> ComposedModel:
    t = tower(n_layers, seed)
    p = parts(t, seed)
    return ComposedModel(t, {k: p[k] for k in p if k in kinds or (k == "image" and "video" in kinds)}).eval()


class CharTok:
    """A character tokenizer with the interface generation uses; ids 3.. for characters, below the debug vocabulary
    of 512. Decoded text is the ids joined by commas, so a test reads exactly which ids were generated."""

    bos_id, eos_id, pad_id, add_bos = 2, 1, 0, True
    stop_ids = frozenset({1})
    chat_format = "chatml"
    special_tokens = {
        "<|begin_of_text|>": 2,
        "<|im_start|>": 410,
        "<|im_end|>": 411,
        "<|start_header_id|>": 412,
        "<|end_header_id|>": 413,
        "<|eot_id|>": 414,
    }

    def token_to_id(self, token: str) -> int:
        return self.special_tokens[token]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + [3 + (ord(c) % 400) for c in text]

    def decode(self, ids) -> str:
        return ",".join(map(str, ids))

    def ids_starting_with(self, prefix: bytes) -> set[int]:
        return {3 + (c % 400) for c in prefix[:1]}


def moving_square(direction: str, frames: int = 8, size: int = 28) -> torch.Tensor:
    """Normalised frames [F, 3, S, S] of a blue square moving left, right or up."""
    out = []
    for k in range(frames):
        img = np.ones((size, size, 3), np.float32)
        if direction == "up":
            y = size - 8 - 2 * k
            img[y : y + 6, 10:16] = (0.1, 0.2, 0.9)
        else:
            x = 2 + 2 * k if direction == "right" else size - 8 - 2 * k
            img[10:16, x : x + 6] = (0.1, 0.2, 0.9)
        out.append(normalize(torch.from_numpy(img).permute(2, 0, 1)))
    return torch.stack(out)


def video_bytes(direction: str = "right", frames: int = 8, size: int = 28) -> bytes:
    """An mp4 of `moving_square` (H.264 through PyAV)."""

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for k in range(frames):
            img = np.full((size, size, 3), 255, np.uint8)
            x = 2 + 2 * k if direction == "right" else size - 8 - 2 * k
            img[10:16, x : x + 6] = (25, 50, 230)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return buf.getvalue()


def wav_bytes(seconds: float = 0.5, freq: float = 440.0) -> bytes:
    """A 16 kHz mono sine as a WAV file."""
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    g = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(g.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


HF_V = 120  # the tiny Mllama's vocabulary (its <|image|> id)


def hf_mllama(
    folder,
    cross_layers=(1, 4),
    n_text_layers: int = 6,
    kv_heads: int = 2,
    seed: int = 0,
    vocab: int = HF_V,
    gate: float | None = None,
):
    """A random transformers Mllama (gates open, random in [-1.2, 1.2] or all `gate`: zero gates would hide every
    cross-attention bug), saved to `folder`; returns the transformers model. `vocab`: its text vocabulary (and
    `<|image|>` id); 49152 is SmolLM2's, so the committed shards and tokenizer train on it."""
    import transformers  # noqa: PLC0415 - the numeric reference, dev extra only

    torch.manual_seed(seed)
    cfg = transformers.MllamaConfig(
        vision_config=dict(
            hidden_size=32,
            attention_heads=4,
            num_hidden_layers=5,
            num_global_layers=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[1, 3],
            vision_output_dim=96,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=n_text_layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            intermediate_size=96,
            cross_attention_layers=list(cross_layers),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        image_token_index=vocab,
    )
    hf = transformers.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "gate" in n:
                p.uniform_(-1.2, 1.2) if gate is None else p.fill_(gate)
    hf.save_pretrained(folder)
    return hf


def adapter_files(t: Transformer, folder, kinds=("image", "video", "speech"), seed: int = 0, gates: float = 0.7):
    """Adapter files of fresh tiny parts for tower `t` (a video file comes with its image file): {kind: path}."""

    p = parts(t, seed, gates)
    kinds = list(dict.fromkeys(["image", *kinds] if "video" in kinds else kinds))
    m = ComposedModel(t, {k: p[k] for k in kinds})
    out = {}
    for k in kinds:
        out[k] = folder / f"{k}.safetensors"
        save_part(m, k, out[k])
    return out
