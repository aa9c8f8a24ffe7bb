"""How hard is each seed's draw of held-out clips? One trained classifier (a run's encoder stage: encoder + heads)
reads the held-out video clips each demo seed draws (`motion_records("test", N, seed + 3)`, as the corpora stage
draws them) and the composites it draws (`composite_records("test", 500, seed + 1)`). With the classifier fixed, the
spread between draws is the test sets' own sampling spread: the part of the seed-to-seed spread of
`video.item_right` that no training change can remove. Also the classes each draw holds, and the classifier's
accuracy per class.

Usage: python benchmarks/demo_video_draws.py --run runs/demo [--seeds 0 1 2 3 4] [--clips 400] [--composites 500]
Ends with one JSON line: {"run": ..., "draws": {seed: {"clips": {...}, "composites": ...}}}.

Measured (2-core Intel Xeon, fp32; the classifier of seed 0's full demo, 92.0% on its own composites): the 400-clip
draws of seeds 0, 1, 2 read 93.0 / 93.2 / 90.8% (seed 2's captioner read 89.0% on that draw on the AMD EPYC), the
1,200-clip draws of seeds 0-4 93.0 / 92.5 / 92.9 / 94.1 / 91.8%, the composite draws (500) 92.0 / 91.9 / 91.9 / 92.2 /
93.0%. `--seeds 0 1 2 --clips 400` and `--seeds 0 1 2 3 4 --clips 1200`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mm_llama.data.shards import read_index, read_samples
from mm_llama.data.writer import write_shards
from mm_llama.recipes.demo import scenes
from mm_llama.recipes.demo.classifier import classifier_accuracy, classifier_video_hits, hit_fractions, load_classifier  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a demo run whose encoder stage kept its heads")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--composites", type=int, default=500)
    a = ap.parse_args(argv)
    model = load_classifier(Path(a.run))
    if model is None:
        print(f"{a.run}: no encoder/encoder.safetensors + encoder/heads.safetensors (run the encoder stage)")
        return 2
    torch.set_grad_enabled(False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            write_shards(scenes.motion_records("test", a.clips, seed + 3), Path(tmp, f"v{seed}"), progress=False)
            clips = read_samples(read_index(Path(tmp, f"v{seed}/index.json"))[0])
            write_shards(
                scenes.composite_records("test", a.composites, seed + 1), Path(tmp, f"i{seed}"), progress=False
            )
            comps = read_samples(read_index(Path(tmp, f"i{seed}/index.json"))[0])
            labels = [json.loads(s["json"])["label"] for s in clips]
            hits = classifier_video_hits(model, clips)  # each clip read once; overall and per class from the same
            per_class = {}
            for k in range(10):
                mine = [h for h, lab in zip(hits["both"], labels) if lab == k]
                if mine:
                    per_class[scenes.FASHION_CLASSES[k]] = {"clips": len(mine), "both": sum(mine) / len(mine)}
            res = {
                "clips": hit_fractions(hits),
                "composites": classifier_accuracy(model, comps)[0],
                "per_class": per_class,
            }
            out[seed] = res
            hard = sum(v["clips"] for c, v in per_class.items() if c in ("T-shirt", "shirt", "pullover", "coat"))
            print(
                f"seed {seed}'s draws: clips {res['clips']['both']:.1%} (first frame {res['clips']['first']:.1%}, "
                f"last {res['clips']['last']:.1%}), composites {res['composites']:.1%}; upper-body garments "
                f"{hard} of {len(clips)} clips",
                flush=True,
            )
    print(json.dumps({"run": a.run, "draws": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
