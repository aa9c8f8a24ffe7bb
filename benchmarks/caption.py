"""Caption generation throughput: image K/V cached once per request vs recomputed every step, and vs
transformers' Mllama `generate`, on the same tiny-but-not-trivial random Mllama checkpoint (CPU, fp32, greedy).

Both models load the same `save_pretrained` folder (ours through `adapters.load_pretrained`); generated tokens
must be identical (ours runs with transformers-5 compatibility switches so the numerics are HF's).
A last line per size says how much of our time is dense math (matmuls, attention, convolutions: the same fp32
kernels on both sides, measured with torch.profiler) and the ratio to transformers if all other time were zero --
the ceiling for any framework-overhead saving on this machine.
Usage: python benchmarks/caption.py [--new-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import transformers
from PIL import Image
from torch.profiler import ProfilerActivity, profile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from mm_llama.adapters import load_pretrained
from mm_llama.adapters.generation import Collate, generate_items
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.samples import plain_requests
from mm_llama.data.collate import cross_attention_mask
from mm_llama.generate import generate_ids, left_padded

V = 2048


class Tok:
    """Minimal tokenizer for random weights: the prompt is fixed ids; no stop tokens."""

    bos_id, eos_id, pad_id, add_bos, stop_ids = 1, None, 0, True, set()

    def encode(self, text):
        return [10 + i for i in range(12)]

    def decode(self, ids):
        return " ".join(map(str, ids))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="512x10,256x6", help="text width x layers, comma list")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        dim, layers = (int(v) for v in size.split("x"))
        bench(args, dim, layers)


def bench(args, dim: int, layers: int):
    # long: a benchmark reads top to bottom: set-up, each side timed, the ratios
    torch.manual_seed(0)
    cfg = transformers.MllamaConfig(
        vision_config=dict(
            hidden_size=256,
            attention_heads=8,
            num_hidden_layers=8,
            num_global_layers=2,
            intermediate_size=1024,
            image_size=112,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[3, 7],
            vision_output_dim=768,
        ),
        text_config=dict(
            vocab_size=V,
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=3 * dim,
            cross_attention_layers=[3, layers - 2],
            pad_token_id=0,
            eos_token_id=None,
            bos_token_id=1,
        ),
        image_token_index=V,
    )
    hf = transformers.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "gate" in n:
                p.fill_(0.5)
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    ours = load_pretrained(d, hf_compat_masking=True, intermediate_from="output")
    img = Image.fromarray((torch.rand(224, 300, 3) * 255).byte().numpy())
    n = args.new_tokens

    item = plain_requests(ours, Tok(), "image", [img], "x.png", AnswerOptions(prompt="x"))[0]
    ids = item["input_ids"]
    pix = Collate(["image"]).inputs([item])

    def run(mode):
        """cached: the product path (generate_items: K/V once per request); recompute_kv: each block's K/V from
        the cached media tokens at every step; recompute_all: the vision encoder too, at every step."""
        if mode == "cached":
            return generate_items(ours, Tok(), [item], max_new_tokens=n)[0]
        layout = left_padded([ids], 0, n)
        xmask = cross_attention_mask(layout.tolist(), V, [[int(pix["aspect_ratio_mask"][0, 0].sum())]], 4)
        states = ours.states(layout, pix, cache_kv=False) if mode == "recompute_kv" else None

        def extra(_pad, start, k):
            if states is not None:
                return {"states": ours.step_states(states, start, k)}
            return {**pix, "cross_attention_mask": xmask[:, start : start + k]}

        with torch.inference_mode():
            out = generate_ids(ours, [ids], max_new_tokens=n, pad_id=0, forward_extra=extra)
        return Tok().decode(out[0])

    tiles = [[int(pix["aspect_ratio_mask"][0, 0].sum())]]
    x = dict(input_ids=torch.tensor([ids]), **pix, cross_attention_mask=cross_attention_mask([ids], V, tiles, 4))

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return " ".join(map(str, out[0, len(ids) :].tolist()))

    rows = {}
    outputs = {}
    modes = (
        ("ours, K/V cached", lambda: run("cached")),
        ("ours, K/V recomputed", lambda: run("recompute_kv")),
        ("ours, vision+K/V recomputed", lambda: run("recompute_all")),
        ("transformers", run_hf),
    )
    for name, fn in modes:
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs[name] = fn()
            times.append(time.perf_counter() - t0)
        rows[name] = n / statistics.median(times)
    same = len(set(outputs.values())) == 1
    print(
        f"\nMllama-style model: text d={dim} x {layers} layers (2 cross-attention), vision d=256 x 10, "
        f"4 tiles of 112 px, {n} new tokens, {torch.get_num_threads()} threads; same tokens: {same}"
    )
    base = rows["transformers"]
    for name, r in rows.items():
        print(f"{name:<30}{r:>9.1f} tok/s{r / base:>8.2f}x transformers")
    share = dense_share(lambda: run("cached"))
    print(
        f"dense math is {100 * share:.0f}% of ours (K/V cached); with zero other time ours would be "
        f"{rows['ours, K/V cached'] / share / base:.2f}x transformers"
    )


DENSE = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::mkldnn_convolution",
    "aten::convolution_overrideable",
)


def dense_share(fn) -> float:
    """Fraction of self CPU time spent in dense-math kernels during one call of fn."""

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in DENSE) / total


if __name__ == "__main__":
    main()
