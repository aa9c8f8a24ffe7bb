"""The Llama 3 paper's speech path: Conformer encoder -> speech adapter -> embeddings spliced into the frozen tower.

  log-mel [B, F, 80] (10 ms) -> stack 4 frames + Linear (40 ms) -> N Conformer layers
  -> adapter: Conv1d k3 s2 (80 ms) -> one rotary Transformer layer -> Linear to the tower width
  -> one embedding per placeholder token in the prompt ("Repeat after me in English:" + audio + transcript)

Conformer layer (Macaron): x + 1/2 FFN(x) -> x + RoPE-MHSA(LN x) -> x + Conv(LN x) -> x + 1/2 FFN(x) -> LN,
Conv = pointwise (2d) + GLU -> depthwise k7 -> LayerNorm -> Swish -> pointwise. LayerNorm (not BatchNorm) in
the conv module keeps a clip's output independent of its batch. Frames past a clip's length are zeroed before
every convolution and masked as attention keys, so padding never changes a clip's output.

Shape legend: B batch, F mel frames, T encoder frames, D width, H heads, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.llama.model import apply_rope, rope_inv_freq


@dataclass(frozen=True)
class ConformerArgs:
    n_mels: int = 80
    stack: int = 4
    width: int = 1536
    layers: int = 24
    heads: int = 24
    ffn_dim: int = 4096
    kernel: int = 7
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class AdapterArgs:
    width: int = 2560
    heads: int = 20
    ffn_dim: int = 10240
    rope_theta: float = 10000.0
    stack: int = 1  # encoder frames concatenated before the conv: 2 turns Whisper's 20 ms frames into 80 ms tokens


CONFORMER_PRESETS = {
    "paper": ConformerArgs(),  # ~1B
    "small": ConformerArgs(width=256, layers=8, heads=4, ffn_dim=1024),
    "debug": ConformerArgs(width=32, layers=2, heads=4, ffn_dim=64),
}
ADAPTER_PRESETS = {
    "paper": AdapterArgs(),  # ~100M with the paper encoder and an 8B tower
    "small": AdapterArgs(width=256, heads=4, ffn_dim=1024),
    "small_whisper": AdapterArgs(width=256, heads=4, ffn_dim=1024, stack=2),  # 20 ms Whisper frames -> 80 ms
    "small_whisper_160ms": AdapterArgs(width=256, heads=4, ffn_dim=1024, stack=4),  # -> 160 ms: half the rows
    "small_160ms": AdapterArgs(width=256, heads=4, ffn_dim=1024, stack=2),  # 40 ms Conformer frames -> 160 ms
    "debug": AdapterArgs(width=32, heads=4, ffn_dim=64),
}


def _rope(T: int, head_dim: int, theta: float, device) -> torch.Tensor:
    angles = torch.arange(T, device=device).float()[:, None] * rope_inv_freq(head_dim, theta, device=device)
    return torch.polar(torch.ones_like(angles), angles)[None]  # [1, T, K/2]


class RotaryAttention(nn.Module):
    def __init__(self, d: int, heads: int, theta: float):
        super().__init__()
        self.heads, self.head_dim, self.theta = heads, d // heads, theta
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x_BTD, key_mask_B11T):
        B, T, D = x_BTD.shape
        freqs = _rope(T, self.head_dim, self.theta, x_BTD.device)
        q = apply_rope(self.wq(x_BTD).view(B, T, self.heads, -1), freqs).transpose(1, 2)
        k = apply_rope(self.wk(x_BTD).view(B, T, self.heads, -1), freqs).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask_B11T)
        return self.wo(o.transpose(1, 2).reshape(B, T, D))


class MacaronFFN(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.w2(F.silu(self.w1(self.norm(x))))


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x_BTD, frame_ok_BT):
        keep = frame_ok_BT[:, None].to(x_BTD.dtype)
        y = F.glu(self.pointwise1(self.norm(x_BTD).transpose(1, 2)), dim=1) * keep
        y = self.depthwise(y).transpose(1, 2)
        y = F.silu(self.conv_norm(y)).transpose(1, 2)
        return self.pointwise2(y).transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, a: ConformerArgs):
        super().__init__()
        self.ffn1 = MacaronFFN(a.width, a.ffn_dim)
        self.attn_norm = nn.LayerNorm(a.width)
        self.attn = RotaryAttention(a.width, a.heads, a.rope_theta)
        self.conv = ConvModule(a.width, a.kernel)
        self.ffn2 = MacaronFFN(a.width, a.ffn_dim)
        self.final_norm = nn.LayerNorm(a.width)

    def forward(self, x, frame_ok, key_mask):
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn(self.attn_norm(x), key_mask)
        x = x + self.conv(x, frame_ok)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


def _masks(lengths: torch.Tensor, T: int):
    ok = torch.arange(T, device=lengths.device)[None] < lengths[:, None]
    # (the meta device, where the memory plan runs: full-length clips, no mask)
    return ok, (None if ok.is_meta or bool(ok.all()) else ok[:, None, None, :])


def conformer_frames(mel_lengths, stack: int):
    """Conformer output frames for `mel_lengths` log-mel frames (stacked by `stack`)."""
    return (mel_lengths + stack - 1) // stack


def adapter_frames(lengths, stack: int):
    """Speech adapter output rows for `lengths` encoder frames (stack, then conv k3 s2)."""
    return ((lengths + stack - 1) // stack - 1) // 2 + 1


class ConformerEncoder(nn.Module):
    def __init__(self, a: ConformerArgs):
        super().__init__()
        self.args = a
        self.input_proj = nn.Linear(a.n_mels * a.stack, a.width)
        self.layers = nn.ModuleList(ConformerLayer(a) for _ in range(a.layers))

    def output_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        return conformer_frames(mel_lengths, self.args.stack)

    @property
    def out_dim(self) -> int:
        return self.args.width

    def forward(self, mel_BFM: torch.Tensor, mel_lengths: torch.Tensor | None = None):
        """log-mel [B, F, n_mels] -> (hidden [B, T, D], lengths [B]) with T = ceil(F / 4)."""
        B, Fr, M = mel_BFM.shape
        if mel_lengths is None:
            mel_lengths = torch.full((B,), Fr, dtype=torch.long, device=mel_BFM.device)
        s = self.args.stack
        frame_ok = torch.arange(Fr, device=mel_BFM.device)[None] < mel_lengths[:, None]
        x = F.pad(mel_BFM * frame_ok[..., None], (0, 0, 0, (-Fr) % s))
        x = self.input_proj(x.reshape(B, -1, s * M))
        lengths = self.output_lengths(mel_lengths)
        ok, key_mask = _masks(lengths, x.shape[1])
        x = x * ok[..., None]
        for layer in self.layers:
            x = layer(x, ok, key_mask) * ok[..., None]
        return x, lengths


class SpeechAdapter(nn.Module):
    """[stack frames] -> Conv1d k3 s2 (40 -> 80 ms) -> one rotary pre-norm Transformer layer (+ final norm) ->
    Linear to the tower width."""

    def __init__(self, in_dim: int, out_dim: int, a: AdapterArgs):
        super().__init__()
        self.args = a
        self.conv = nn.Conv1d(in_dim * a.stack, a.width, 3, stride=2, padding=1)
        self.attn_norm = nn.LayerNorm(a.width)
        self.attn = RotaryAttention(a.width, a.heads, a.rope_theta)
        self.ffn_norm = nn.LayerNorm(a.width)
        self.ffn = nn.Sequential(nn.Linear(a.width, a.ffn_dim), nn.GELU(), nn.Linear(a.ffn_dim, a.width))
        self.out_norm = nn.LayerNorm(a.width)  # the pre-norm layer's final norm: the projection sees unit scale
        self.proj = nn.Linear(a.width, out_dim)

    @torch.no_grad()
    def init_output_scale(self, target_std: float) -> None:
        """Start the outputs at the scale of the frozen token table they are spliced between (a frozen LM reads
        100x-too-large rows as noise, and learning to shrink them costs most of a short run)."""
        self.proj.weight.normal_(0.0, target_std / self.args.width**0.5)
        self.proj.bias.zero_()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return adapter_frames(lengths, self.args.stack)

    def forward(self, x_BTD: torch.Tensor, lengths: torch.Tensor):
        ok_in = torch.arange(x_BTD.shape[1], device=x_BTD.device)[None] < lengths[:, None]
        x = x_BTD * ok_in[..., None]
        s = self.args.stack
        if s > 1:  # [B, T, D] -> [B, ceil(T/s), s*D] (zero-padded tail)
            B, T, D = x.shape
            x = F.pad(x, (0, 0, 0, -T % s)).reshape(B, -1, s * D)
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        out_len = self.output_lengths(lengths)
        ok, key_mask = _masks(out_len, h.shape[1])
        h = h + self.attn(self.attn_norm(h), key_mask)
        h = h + self.ffn(self.ffn_norm(h))
        return self.proj(self.out_norm(h)) * ok[..., None], out_len


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
