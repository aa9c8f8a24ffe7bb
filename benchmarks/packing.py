"""Packing vs padding, our recipe's own pieces (conversation rendering, Collate, the composed model's training
forward + backward + AdamW step), the same samples per step on both sides.

Data: synthetic conversations whose token counts are lognormal (median 60, p99 600: sigma = ln(10) / 2.326),
capped at --max-tokens, each with 0-3 images (uniform) before the question; 30% of a conversation's text is the
question, 70% the answer (labelled). Model: a random Llama-style tower (d 256, 8 layers, vocabulary 8192) with the
debug image part (cross-attention before every 4th layer), fp32 on the CPU. Each step's --batch samples are laid
out padded (one row each, right-padded to the longest) or packed (data.pack: first-fit into rows of at most
--max-tokens, block-diagonal attention through a dense mask on the CPU).

Steps are timed in alternation (padded, packed; packed, padded; ...) after a warm-up; the figure is the median of
the per-step ratios. The losses of both layouts are computed on the same weights before the timed steps.
Usage: python benchmarks/packing.py [--steps 10] [--batch 16] [--max-tokens 1024]
Last line (JSON): packed_vs_padded_tokens_per_s, padding_fraction_padded, padding_fraction_packed,
packed_loss_rel_diff (+ the per-step figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.image import build_image_part
from mm_llama.adapters.samples import Samples
from mm_llama.data.conversation import Message, Part
from mm_llama.llama import Transformer, get_preset

SIGMA = math.log(10) / 2.326  # lognormal: p99 / median = 10


class CharTok:
    """Characters as tokens (ids 3..402) with ChatML markers: a text's length in characters is its token count."""

    bos_id, eos_id, pad_id, add_bos = 2, 1, 0, True
    stop_ids = frozenset({1})
    chat_format = "chatml"
    special_tokens = {"<|im_start|>": 410, "<|im_end|>": 411}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + [3 + (ord(c) % 400) for c in text]

    def decode(self, ids) -> str:
        return ",".join(map(str, ids))

    def token_to_id(self, token: str) -> int:
        return self.special_tokens[token]


def conversations(n: int, max_tokens: int, seed: int) -> list[list[Message]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        total = int(min(max(rng.lognormal(math.log(60), SIGMA), 8), max_tokens - 40))
        q, a = max(1, int(0.3 * total)), max(1, total - int(0.3 * total))
        letters = "abcdefghij klmnopqrst"
        images = [
            Part("image", ref=Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)), name=f"{k}.png")
            for k in range(int(rng.integers(0, 4)))
        ]
        question = "".join(rng.choice(list(letters), q))
        answer = "".join(rng.choice(list(letters), a))
        out.append([Message("user", [*images, Part("text", question)]), Message("assistant", [Part("text", answer)])])
    return out


def model(seed: int = 0) -> ComposedModel:
    args = get_preset("debug").replace(
        dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=8192, max_seq_len=4096
    )
    tower = Transformer(args)
    tower.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    image = build_image_part(tower.requires_grad_(False), "debug")
    with torch.no_grad():
        for blk in image.cross_attention_layers:
            blk.gate_attn.fill_(0.5)
            blk.gate_ffwd.fill_(0.5)
    return ComposedModel(tower, image=image).train()


def step(m: ComposedModel, opt, batch: dict) -> float:
    t0 = time.perf_counter()
    out = m(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def padding_fraction(batch: dict) -> float:
    ids = batch["input_ids"]
    real = int((batch["segment_ids"] >= 0).sum()) if "segment_ids" in batch else sum(batch["lengths"])
    return 1 - real / ids.numel()


def main() -> None:
    # long: a benchmark reads top to bottom: data, both layouts' losses, the timed alternation, the figures
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    m = model(args.seed)
    tok = CharTok()
    samples = Samples.of(m, tok, kinds=["image"])
    convs = conversations(args.batch * (args.steps + 1), args.max_tokens, args.seed)
    items = [samples.render(c, conversation=True)[0] for c in convs]
    lengths = sorted(len(it["input_ids"]) for it in items)
    padded_c, packed_c = Collate(["image"]), Collate(["image"], pack_tokens=args.max_tokens)
    steps = [items[i * args.batch : (i + 1) * args.batch] for i in range(args.steps + 1)]
    padded = [{**padded_c(s), "lengths": [len(it["input_ids"]) for it in s]} for s in steps]
    packed = [packed_c(s) for s in steps]
    fractions = {"padded": [padding_fraction(b) for b in padded], "packed": [padding_fraction(b) for b in packed]}
    for b in padded:
        b.pop("lengths")
    with torch.no_grad():
        pairs = [(m(**a).loss.item(), m(**b).loss.item()) for a, b in zip(padded, packed)]
    rel = max(abs(a - b) / abs(a) for a, b in pairs)
    print("losses (padded, packed):", pairs)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    step(m, opt, padded[0])  # warm-up: both layouts once
    step(m, opt, packed[0])
    times = {"padded": [], "packed": []}
    for i in range(1, args.steps + 1):
        order = ("padded", "packed") if i % 2 else ("packed", "padded")
        for name in order:
            times[name].append(step(m, opt, (padded if name == "padded" else packed)[i]))
    real = [sum(len(it["input_ids"]) for it in s) for s in steps[1:]]
    ratios = [a / b for a, b in zip(times["padded"], times["packed"])]
    cpu = platform.processor() or platform.machine()
    print(
        f"{args.batch} conversations per step, lengths median {lengths[len(lengths) // 2]}, "
        f"p99 {lengths[int(0.99 * (len(lengths) - 1))]}, max {lengths[-1]} tokens; 0-3 images each; "
        f"{torch.get_num_threads()} threads, {cpu}"
    )
    for name, batches in (("padded", padded), ("packed", packed)):
        tps = statistics.median(n / t for n, t in zip(real, times[name]))
        rows = statistics.mean(b["input_ids"].shape[0] for b in batches[1:])
        pad = statistics.mean(fractions[name])
        print(f"{name:7s} {tps:9.0f} real tokens/s   padding {pad:.1%}   rows/step {rows:.1f}")
    ratio = statistics.median(ratios)
    print(f"packed / padded tokens/s: median of {args.steps} steps {ratio:.2f}x; loss rel diff {rel:.1e}")
    print(
        json.dumps(
            {
                "packed_vs_padded_tokens_per_s": round(statistics.median(ratios), 3),
                "padding_fraction_padded": round(statistics.mean(fractions["padded"]), 4),
                "padding_fraction_packed": round(statistics.mean(fractions["packed"]), 4),
                "packed_loss_rel_diff": rel,
                "step_ratios": [round(r, 3) for r in ratios],
                "seconds_padded": [round(t, 3) for t in times["padded"]],
                "seconds_packed": [round(t, 3) for t in times["packed"]],
            }
        )
    )


if __name__ == "__main__":
    main()
