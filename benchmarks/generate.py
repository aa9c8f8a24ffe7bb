"""Greedy decode and prefill throughput: mm_llama `generate` vs transformers `generate` on SmolLM2-135M (CPU fp32).

Both models come from the same GGUF file; outputs must be token-identical. Prints medians and ratios.
Usage: python benchmarks/generate.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mm_llama.assets import asset_path  # noqa: E402
from mm_llama.generate import generate_ids  # noqa: E402
from mm_llama.llama import Tokenizer, load_pretrained  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the twentieth century were",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite recipe for a quick weeknight dinner is",
    "The theory of relativity explains",
    "In the year 2050, cities will",
]


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list; the target is judged on float32")
    args = ap.parse_args()
    for name in args.dtypes.split(","):
        run(args, getattr(torch, name))


def run(args, dtype):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    path = asset_path("smollm2_gguf")
    ours = load_pretrained(path, dtype=dtype)
    tok = Tokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf = hf.to(dtype)
    n = args.new_tokens
    print(
        f"\n== {dtype} | torch {torch.__version__}, threads {torch.get_num_threads()}, new tokens {n}, "
        f"repeats {args.repeats} (median)"
    )
    rows = []
    for bs in (1, 8):
        prompts = [tok.encode(p) for p in PROMPTS[:bs]]

        def run_ours(prompts=prompts):
            return generate_ids(ours, prompts, max_new_tokens=n)

        def run_hf(prompts=prompts):
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
            att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                out = hf.generate(
                    input_ids=ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=tok.pad_id, eos_token_id=None,
                )  # fmt: skip
            return [row[width:].tolist() for row in out]

        run_ours(), run_hf()  # warm-up
        t_ours, out_ours = median_time(run_ours, args.repeats)
        t_hf, out_hf = median_time(run_hf, args.repeats)
        same = all(a == b[: len(a)] for a, b in zip(out_ours, out_hf))
        n_tok = sum(len(o) for o in out_ours)
        rows.append((f"decode batch {bs}", n_tok / t_ours, n_tok / t_hf, same))

    # prefill: one long prompt, logits for the last position
    ids = torch.randint(0, ours.args.vocab_size, (1, args.prefill_len), generator=torch.Generator().manual_seed(0))

    def pre_ours():
        with torch.inference_mode():
            return ours(ids, last_only=True)

    def pre_hf():
        with torch.inference_mode():
            return hf(ids, logits_to_keep=1).logits

    pre_ours(), pre_hf()
    t_o, lo = median_time(pre_ours, args.repeats)
    t_h, lh = median_time(pre_hf, args.repeats)
    rows.append(
        (f"prefill {args.prefill_len} tokens", ids.numel() / t_o, ids.numel() / t_h, (lo - lh).abs().max().item())
    )

    # the memory-bandwidth bound of batch-1 decode: stream every weight matrix once, nothing else
    mats = [p for p in ours.parameters() if p.dim() == 2]
    xs = {d: torch.randn(1, d, dtype=dtype) for d in {m.shape[1] for m in mats}}

    def stream_weights():
        for m in mats:
            torch.nn.functional.linear(xs[m.shape[1]], m)

    stream_weights()
    t_bound, _ = median_time(stream_weights, args.repeats * 3)
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    print(
        f"weight-streaming bound at batch 1: {t_bound * 1e3:.1f} ms/token ({nbytes / t_bound / 1e9:.1f} GB/s) "
        f"-> at most {1 / t_bound:.1f} tok/s for any implementation in {dtype}"
    )
    print(f"{'measure':<22}{'ours tok/s':>12}{'hf tok/s':>12}{'ratio':>8}  identical tokens / max |dlogit|")
    for name, a, b, same in rows:
        print(f"{name:<22}{a:>12.1f}{b:>12.1f}{a / b:>7.2f}x  {same}")


if __name__ == "__main__":
    main()
