"""One GPU: training throughput of the image adapter on a Llama-3-8B-shaped frozen tower (random weights, bf16).

Prints tokens/s, MFU and peak memory for our DDP engine and for torch's DDP (world size 1, same step otherwise).
Exits cleanly with a message on machines without CUDA.
Usage: python benchmarks/gpu_train.py [--steps 10] [--seq 512] [--batch 2] [--preset llama3_1_8b]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.image import build_image_part
from mm_llama.data.collate import cross_attention_mask
from mm_llama.engine import DistributedDataParallel
from mm_llama.engine.flops import StepFlops, device_peak_flops
from mm_llama.llama import Transformer, get_preset


def main():
    # long: a benchmark reads top to bottom: set-up, each engine timed on the GPU
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--preset", default="llama3_1_8b")
    ap.add_argument("--vision", default="llama3_2_vision")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_train.py: no CUDA device on this machine; nothing to measure.")
        return 0

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    a = get_preset(args.preset)
    with torch.device(dev):
        tower = Transformer(a).to(torch.bfloat16)
    tower.init_weights(std=0.02)
    model = ComposedModel(tower, image=build_image_part(tower, args.vision)).to(dev)
    v = model.image.vision_args
    B, T = args.batch, args.seq
    ids = torch.randint(0, a.vocab_size, (B, T), device=dev)
    ids[:, 1] = model.token_id("image")
    px = torch.randn(B, 1, v.max_num_tiles, 3, v.image_size, v.image_size, device=dev)
    ar_ids = torch.full((B, 1), 1, dtype=torch.long, device=dev)
    ar_mask = torch.zeros(B, 1, v.max_num_tiles, dtype=torch.long, device=dev)
    ar_mask[:, :, 0] = 1
    xm = cross_attention_mask(ids.tolist(), model.token_id("image"), [[1]] * B, v.max_num_tiles).to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak_flops, source = device_peak_flops(dev, torch.bfloat16, float(os.environ.get("PEAK_TFLOPS", 0)))
    n_train = sum(p.numel() for p in trainable) / 1e9
    print(
        f"{torch.cuda.get_device_name()} | tower {args.preset} bf16 frozen | trainable {n_train:.2f}B | "
        f"batch {B} x {T} tokens, 1 tile of {v.image_size}px"
    )
    for engine in ("ours", "torch"):
        wrapped = (
            DistributedDataParallel(model) if engine == "ours" else torch.nn.parallel.DistributedDataParallel(model)
        )
        opt = torch.optim.AdamW(trainable, lr=1e-5)
        torch.cuda.reset_peak_memory_stats()
        times, flops = [], 0
        for step in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            count = StepFlops() if step == 0 else contextlib.nullcontext()  # FLOPs executed (same every step)
            with count:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = wrapped(
                        ids,
                        pixel_values=px,
                        aspect_ratio_ids=ar_ids,
                        aspect_ratio_mask=ar_mask,
                        cross_attention_mask=xm,
                    ).logits
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
            flops = count.total if step == 0 else flops
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        tps = B * T / t
        print(
            f"engine={engine:<6} {tps:9.0f} tokens/s  MFU {flops / t / peak_flops:6.1%} ({source})  "
            f"peak memory {torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB  step {t * 1e3:.0f} ms"
        )
        if engine == "ours":
            wrapped.remove_hooks()
        del wrapped, opt
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
