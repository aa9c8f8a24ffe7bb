"""The demo encoder's design, measured: the demo ViT pretrained as the plain per-cell classifier (the demo's encoder
stage, `recipes.demo.data_stages.train_classifier`) with its two-conv stem and with the plain 28 px patch projection
(Llama 3.2 Vision's own patch conv, one token per cell), same seed, steps and batch; held-out items right on
test-split composites, and the training time of each. The captioners read this encoder frozen, so its item accuracy
is about the ceiling of the image and video item figures.

Usage: python benchmarks/demo_encoder.py [--steps 3000] [--batch 16] [--seeds 0] [--test 500] [--bf16]
Ends with one JSON line: {"stem": {...}, "plain": {...}} (accuracy, seconds per variant, per seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the demo's own code

from mm_llama.adapters.builders import get_vision_preset
from mm_llama.data import corpora
from recipes.demo.data_stages import classifier_accuracy, train_classifier  # noqa: E402


def held_out(n: int, seed: int) -> list[dict]:
    return [{"png": r["image"][1], "json": json.dumps(r["json"])} for r in corpora.composite_records("test", n, seed)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--test", type=int, default=500, help="held-out composites (the demo's image_test size)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with bf16 units)")
    ap.add_argument("--variants", nargs="+", default=["stem", "plain"], choices=["stem", "plain"])
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    demo = get_vision_preset("demo")
    variants = {"stem": demo, "plain": dataclasses.replace(demo, stem=())}
    out: dict[str, dict] = {}
    for name in a.variants:
        accs, secs = {}, {}
        for seed in a.seeds:
            t0 = time.perf_counter()
            model, _ = train_classifier(variants[name], a.steps, a.batch, seed, a.bf16, log_every=0)
            secs[seed] = round(time.perf_counter() - t0, 1)
            accs[seed], items = classifier_accuracy(model, held_out(a.test, seed + 1))
            print(f"{name:6s} seed {seed}: {accs[seed]:.1%} of {items} held-out items, trained in {secs[seed]:.0f} s "
                  f"({a.steps} steps x {a.batch})", flush=True)  # fmt: skip
        out[name] = {"accuracy": accs, "mean": statistics.fmean(accs.values()), "min": min(accs.values()),
                     "seconds": secs}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
