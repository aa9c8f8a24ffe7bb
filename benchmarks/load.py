"""Peak resident memory while loading SmolLM2-135M from its GGUF through `load_pretrained`, vs its fp32 size.

Each measurement runs in a fresh subprocess (ru_maxrss is a high-water mark). The baseline is the RSS of the
same process after importing torch/gguf, so the figure is what loading adds.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, gguf
from mm_llama.assets import asset_path
from mm_llama.llama import load_pretrained
import mm_llama.llama.checkpoint
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
m = load_pretrained(asset_path("smollm2_gguf"), dtype=getattr(torch, sys.argv[1]))
nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"base": base, "peak": rss(), "model_bytes": nbytes}))
"""


READER_ONLY = r"""
import json, resource, gguf, numpy as np
from mm_llama.assets import asset_path
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
r = gguf.GGUFReader(str(asset_path("smollm2_gguf")))
parsed = rss()
for t in r.tensors:
    np.asarray(t.data).view(np.uint8).sum()
print(json.dumps({"parse": parsed - base, "mmap": rss() - parsed}))
"""


def main():
    out = subprocess.run([sys.executable, "-c", READER_ONLY], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"gguf.GGUFReader alone: metadata parse {r['parse'] / 1e6:.0f} MB, touching the mapped file "
        f"{r['mmap'] / 1e6:.0f} MB (file-backed pages)"
    )
    print(f"{'dtype':<10}{'model MB':>10}{'peak added MB':>15}{'ratio':>8}")
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", CHILD, dtype], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        added = r["peak"] - r["base"]
        print(f"{dtype:<10}{r['model_bytes'] / 1e6:>10.0f}{added / 1e6:>15.0f}{added / r['model_bytes']:>7.2f}x")


if __name__ == "__main__":
    main()
