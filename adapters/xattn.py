"""Gated cross-attention block: text hidden states (queries) read image/video tokens (keys/values).

    h = x + tanh(gate_attn) * row_mask * Attn(norm(x), media)          (GQA, per-head RMSNorm on q and k, no RoPE,
    y = h + tanh(gate_ffwd) * row_mask * FFN(norm(h))                   non-causal, FFN of the tower's size)

Both gates start at 0, so a freshly attached block is the identity and the fused model equals the text model.
`row_mask` is 0 for text rows that may see no media at all: Meta zeroes BOTH branches there (what we do by
default); transformers' Mllama zeroes only the FFN branch and lets those rows attend uniformly to every media
token (transformers #39379) -- `hf_compat=True` reproduces that for parity tests.

Shape legend: B batch, T text tokens, S media tokens, D width, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.llama.model import FeedForward, RMSNorm


class CrossAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def media_kv(self, media_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the media tokens [B, G, S, K]: computed once per request, reused at every decode step."""
        B, S, _ = media_BSD.shape
        k = self.k_norm(self.wk(media_BSD).view(B, S, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(media_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x_BTD, kv, mask_B1TS):
        B, T, _ = x_BTD.shape
        q = self.q_norm(self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k, v = kv
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask_B1TS, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, eps: float = 1e-5):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = CrossAttention(dim, n_heads, n_kv_heads, head_dim, eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    @classmethod
    def for_tower(cls, args) -> GatedCrossAttentionBlock:
        return cls(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim, args.norm_eps)

    def media_kv(self, media_BSD):
        return self.attention.media_kv(media_BSD)

    def forward(self, x_BTD, kv, mask_B1TS, row_mask_BT1, *, hf_compat: bool = False):
        """kv: the media's keys/values (`media_kv`, precomputed once for generation) or the media tokens [B, S, D]
        themselves (training: keys/values computed here, inside the block's own forward, so a block sharded with
        FSDP2 has its weights gathered for them)."""
        if torch.is_tensor(kv):
            kv = self.media_kv(kv)
        a = self.attention(self.attention_norm(x_BTD), kv, mask_B1TS)
        if not hf_compat:
            a = a * row_mask_BT1
        h = x_BTD + self.gate_attn.tanh() * a
        f = self.feed_forward(self.ffn_norm(h)) * row_mask_BT1
        return h + self.gate_ffwd.tanh() * f


def media_attention_mask(cross_attention_mask_BTIN: torch.Tensor, tokens_per_tile: int, dtype: torch.dtype):
    """[B, T, I, N] (1 = may attend) -> additive [B, 1, T, I*N*P] mask with finite minimum values, and the row mask
    [B, T, 1] (0 where a text row sees no media). Fully masked rows are opened (bias 0) so the softmax is finite;
    their branch outputs are zeroed by the row mask."""
    B, T = cross_attention_mask_BTIN.shape[:2]
    allowed = cross_attention_mask_BTIN.bool().repeat_interleave(tokens_per_tile, dim=3).reshape(B, T, -1)
    return masks_from_allowed(allowed, dtype)


def masks_from_allowed(allowed_BTS: torch.Tensor, dtype: torch.dtype):
    """Boolean [B, T, S] (True = may attend) -> (additive [B, 1, T, S] bias, row mask [B, T, 1]); rows that may
    attend to nothing are opened (bias 0) and zeroed by the row mask instead."""
    row = allowed_BTS.any(-1, keepdim=True)
    bias = torch.zeros(allowed_BTS.shape, dtype=dtype, device=allowed_BTS.device)
    bias = bias.masked_fill(~allowed_BTS & row, torch.finfo(dtype).min)
    return bias.unsqueeze(1), row.to(dtype)
