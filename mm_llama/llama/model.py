"""The Llama 3 language tower, with Meta's parameter names.

Shape legend: B batch, T query length, S key length (cache + new), D model width, H query heads,
G key/value heads, K head dim, V vocabulary.

The module holds weights and the RoPE frequency table only. Caches belong to generation
(`mm_llama.generate`): a cache object is passed into `forward` and the attention layers call
`cache.update(layer_idx, k, v)` to append and read back keys/values. No process groups live here.

Extension points for composed models (`mm_llama.adapters.composed`); there is one layer loop, this one:
- input rows: `forward(embeds=...)` takes the input embeddings instead of token ids (modality token rows,
  spliced speech rows);
- added blocks: `forward(inject={i: [block, ...]})` runs each `block(h) -> h` before tower layer i, in list
  order (i == n_layers: after the last layer, before the final norm). The tower's own weights never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, RopeScaling, head_dim_of


class AttentionCache(Protocol):
    """What the attention layers ask of a generation cache (`mm_llama.generate.KVCache` is the one we ship)."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values [B, G, T, K] for one layer; return all of them so far [B, G, S, K]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale (Meta and HF order)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """RoPE inverse frequencies [K/2] (made on `device`: no copy in a step), with optional Llama 3.1 "llama3"
    scaling."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, smoothed, out)


def apply_rope(x_BTHK: torch.Tensor, freqs_BTK: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by complex `freqs` (Meta's formulation), in fp32."""
    xc = torch.view_as_complex(x_BTHK.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs_BTK.unsqueeze(2)).flatten(-2).to(x_BTHK.dtype)


class Documents:
    """A packed layout for attention: each row holds several documents (samples) side by side, each attending
    causally to itself only. `spans[b]`: the [start, end) of row b's documents in order (the rest of the row is
    padding, never read). Attention then runs per document (variable length, sum of len^2 work instead of
    rows x T^2 for a dense block-diagonal mask)."""

    def __init__(self, spans: Sequence[Sequence[tuple[int, int]]]) -> None:
        self.spans = [list(s) for s in spans]

    def attend(
        self, q_BHTK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, enable_gqa: bool
    ) -> torch.Tensor:
        B, H, T, K = q_BHTK.shape
        rows = []
        for b in range(B):
            pieces, at = [], 0
            for start, end in self.spans[b]:
                if start > at:
                    pieces.append(q_BHTK.new_zeros(H, start - at, K))
                q, k, v = (t[b : b + 1, :, start:end] for t in (q_BHTK, k_BGTK, v_BGTK))
                pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)[0])
                at = end
            if at < T:
                pieces.append(q_BHTK.new_zeros(H, T - at, K))
            rows.append(torch.cat(pieces, 1))
        return torch.stack(rows)


Mask = torch.Tensor | Documents | None  # boolean [B, 1, T, S] (True = attend), packed documents, or plain causal


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        freqs_BTK: torch.Tensor,
        mask: Mask = None,
        cache: AttentionCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHK = apply_rope(self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim), freqs_BTK)
        k_BTGK = apply_rope(self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim), freqs_BTK)
        v_BTGK = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        q_BHTK, k_BGSK, v_BGSK = (t.transpose(1, 2) for t in (q_BTHK, k_BTGK, v_BTGK))
        if cache is not None:
            k_BGSK, v_BGSK = cache.update(layer_idx, k_BGSK, v_BGSK)
        if isinstance(mask, Documents):  # packed rows: each document attends to itself only
            o_BHTK = mask.attend(q_BHTK, k_BGSK, v_BGSK, self.n_kv_heads != self.n_heads)
            return self.wo(o_BHTK.transpose(1, 2).reshape(B, T, -1))
        is_causal = mask is None and T > 1  # with a cache: only valid for a first, unpadded prefill
        o_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BGSK,
            v_BGSK,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(o_BHTK.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args.dim, args.n_heads, args.n_kv_heads, head_dim_of(args))
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        freqs_BTK: torch.Tensor,
        mask: Mask = None,
        cache: AttentionCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        h = x_BTD + self.attention(self.attention_norm(x_BTD), freqs_BTK, mask, cache, layer_idx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 decoder. `model(tokens)` -> logits [B, T, V] (causal, positions 0..T-1)."""

    inv_freq: torch.Tensor  # a non-persistent buffer

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # on the meta device (checkpoint loading) nothing is initialised: nn.Embedding's normal_ there would import
        # dynamo, a second of start-up for every process that loads a tower (an empty tensor tells the device)
        if torch.empty(0).is_meta:
            table = torch.empty(args.vocab_size, args.dim)
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        else:
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", torch.empty(head_dim_of(args) // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        device = self.tok_embeddings.weight.device
        if device.type == "meta":
            self.inv_freq = torch.empty(head_dim_of(self.args) // 2, device="meta")
            return
        args = self.args
        self.inv_freq = rope_inv_freq(head_dim_of(args), args.rope_theta, args.rope_scaling, device=device)

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation (for tests, benchmarks and debug configs; real use loads a checkpoint)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        self.reset_buffers()

    def rope(self, positions_BT: torch.Tensor) -> torch.Tensor:
        """Complex rotations e^(i * pos * inv_freq), [B, T, K/2] (complex64)."""
        angles_BTK = positions_BT.unsqueeze(-1).float() * self.inv_freq
        return torch.polar(torch.ones_like(angles_BTK), angles_BTK)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: Mask = None,
        cache: AttentionCache | None = None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
        inject: Mapping[int, Sequence[Callable[[torch.Tensor], torch.Tensor]]] | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` [B, T] (or input embeddings `embeds` [B, T, D]).

        positions: [B, T] RoPE positions (default 0..T-1).
        mask: boolean [B, 1, T, S] (True = attend), `Documents` (packed rows: per-document causal attention), or
            None for plain causal attention.
        cache: a generation cache with `update(layer_idx, k, v)`; its owner provides `mask`.
        last_only: compute logits for the last position only (decoding).
        select: boolean [B, T]: logits only where True, as [N, V] (training: only positions that have a label).
        inject: {layer i: [block(h) -> h]} run before layer i (n_layers: after the last), e.g. cross-attention.
        """
        h_BTD = self.tok_embeddings(tokens) if embeds is None else embeds
        B, T, _ = h_BTD.shape
        if positions is None:
            positions = torch.arange(T, device=h_BTD.device).expand(B, T)
        freqs_BTK = self.rope(positions)
        inject = inject or {}
        for i, layer in enumerate(self.layers):
            for block in inject.get(i, ()):
                h_BTD = block(h_BTD)
            h_BTD = layer(h_BTD, freqs_BTK, mask, cache, i)
        for block in inject.get(len(self.layers), ()):
            h_BTD = block(h_BTD)
        return self.logits(h_BTD, last_only, select)

    def logits(self, h_BTD: torch.Tensor, last_only: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + output projection of the chosen positions (all, the last, or `select`)."""
        if last_only:
            h_BTD = h_BTD[:, -1:]
        elif select is not None:
            h_BTD = h_BTD[select]
        return self.output(self.norm(h_BTD)).float()
