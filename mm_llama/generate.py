"""Text generation for the tower: the KV cache lives here, not in the model.

Batched prompts of different lengths are LEFT-padded. Each sequence gets RoPE positions that start at 0 on its
first real token, and a key-padding mask hides the pad slots, so a padded prompt produces the same logits as the
same prompt alone. Prefill runs the whole prompt once; each decode step runs one token per sequence and appends
its keys/values to the preallocated cache.

Shape legend: B batch, T new tokens this step, S filled cache length, L layers, G kv heads, K head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .llama.config import ModelArgs, head_dim_of
from .llama.tokenizer import Tokenizer


class Decoder(Protocol):
    """What generation asks of a model: the tower (`Transformer`) or a composed model over it, called as the tower
    is (`tokens, positions=, mask=, cache=, last_only=`) and returning logits or an output object holding them."""

    @property
    def args(self) -> ModelArgs: ...

    @property
    def tok_embeddings(self) -> nn.Embedding: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class HasLogits(Protocol):
    @property
    def logits(self) -> torch.Tensor | None: ...


class KVCache:
    """Preallocated per-layer key/value cache [L, B, G, max_len, K]; `update` appends at `self.pos`."""

    def __init__(
        self,
        model: Decoder,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        a = model.args
        p = model.tok_embeddings.weight
        shape = (a.n_layers, batch_size, a.n_kv_heads, max_len, head_dim_of(a))
        self.k = torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer_idx: int, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k_BGTK.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.max_len}")
        self.k[layer_idx, :, :, self.pos : end] = k_BGTK
        self.v[layer_idx, :, :, self.pos : end] = v_BGTK
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


def sample_next(
    logits_BV: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy when temperature == 0, else temperature / top-k / top-p (nucleus) sampling. -> [B]"""
    if temperature <= 0.0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, new_tokens: int = 0) -> torch.Tensor:
    """The batch as `generate_ids` lays it out: [B, P + new_tokens] ids, each prompt right-aligned to end at the
    longest prompt's length P, `pad_id` before it and in the `new_tokens` slots after (fused models build their
    media masks over this layout)."""
    P = max(len(p) for p in prompts)
    out = torch.full((len(prompts), P + new_tokens), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        out[b, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
    return out


@torch.inference_mode()
def generate_ids(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    forward_extra: Callable[[int, int, int], dict] | None = None,
) -> list[list[int]]:
    # long: prefill and the decode loop share the cache, mask and position state
    """New token ids per prompt (stop token excluded). `on_token(seq_index, token_id)` streams them.

    forward_extra(pad, start, length) -> extra keyword arguments for the model call that covers cache slots
    [start, start + length) of a batch left-padded by `pad` slots (fused multimodal models pass their media K/V
    and cross-attention masks this way; the text tower needs none)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    device = model.tok_embeddings.weight.device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    P = max(lens)
    total = P + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {model.args.max_seq_len}"
        )
    tokens_BP = left_padded(prompts, pad_id).to(device)
    # a slot is real from its row's first prompt token on (the prompt, then every new token)
    valid_BS = (torch.arange(total)[None] >= torch.tensor([P - n for n in lens])[:, None]).to(device)
    padded = min(lens) != P
    positions_BP = (valid_BS[:, :P].long().cumsum(-1) - 1).clamp(min=0)

    cache = KVCache(model, B, total)
    mask = None
    if padded:
        causal_PP = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        eye_PP = torch.eye(P, dtype=torch.bool, device=device)
        mask = ((causal_PP & valid_BS[:, None, :P]) | eye_PP)[:, None]  # [B, 1, P, P]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    extra = (lambda start, n: forward_extra(P, start, n)) if forward_extra is not None else (lambda start, n: {})
    logits = _logits(model(tokens_BP, positions=positions_BP, mask=mask, cache=cache, last_only=True, **extra(0, P)))
    cache.advance(P)
    next_pos_B = positions_BP[:, -1] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt_B = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for b, t in enumerate(nxt_B.tolist()):
            if done[b]:
                continue
            if t in stop_ids:
                done[b] = True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, t)
        if all(done) or step == max_new_tokens - 1:
            break
        S = cache.pos + 1
        valid_BS[:, cache.pos] = True
        step_mask = valid_BS[:, None, None, :S] if padded else None
        step_out = model(
            nxt_B[:, None], positions=next_pos_B[:, None], mask=step_mask, cache=cache, **extra(cache.pos, 1)
        )
        logits = _logits(step_out)
        cache.advance(1)
        next_pos_B = next_pos_B + 1
    return out


def _logits(out: torch.Tensor | HasLogits) -> torch.Tensor:
    """The tower returns logits; a composed model returns an output object holding them."""
    if isinstance(out, torch.Tensor):
        return out
    if out.logits is None:
        raise ValueError("the model's output holds no logits")
    return out.logits


def bos_prefix(tok: Tokenizer) -> list[int]:
    """[BOS] when the tokenizer's model expects one, else []."""
    return [tok.bos_id] if (tok.add_bos and tok.bos_id is not None) else []


def padding_id(tok: Tokenizer) -> int:
    """The id used to left-pad batched prompts (never attended to): pad, else EOS, else 0."""
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


def encode_prompts(
    tok: Tokenizer, prompts: Sequence[str], *, chat: bool = False, system: str | None = None
) -> list[list[int]]:
    if chat:
        msgs = [[{"role": "system", "content": system}] if system else [] for _ in prompts]
        return [tok.format_chat(m + [{"role": "user", "content": p}]) for m, p in zip(msgs, prompts)]
    return [tok.encode(p, bos=tok.add_bos) for p in prompts]


def generate(
    model: Decoder,
    tok: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    system: str | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Completions (prompt excluded) for each prompt. `chat=True` wraps prompts in the tower's chat format."""
    if isinstance(prompts, str):
        raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
    ids = encode_prompts(tok, prompts, chat=chat, system=system)
    pad = padding_id(tok)
    out = generate_ids(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=set(tok.stop_ids),
        pad_id=pad,
        seed=seed,
        on_token=on_token,
    )
    return [tok.decode(o) for o in out]


class StreamPrinter:
    """Turns token ids into text chunks for a terminal, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer, write: Callable[[str], object]) -> None:
        self.tok, self.write = tok, write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, _seq: int, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)
