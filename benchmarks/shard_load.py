"""Towers loaded shard by shard: each rank's peak host memory while the recipe builds and places a sharded
(`parallel.tower=fsdp`) model, with the tower read whole on every rank (before) vs row by row (each rank reads only
the rows it keeps, after the embeddings: mm_llama/llama/slices.py).

A random tower of about 1.1B parameters (dim 2048, 16 layers, vocabulary 32000; 2.3 GB in bf16) is written once
to --work, as a Meta folder (consolidated.00.pth) or a Hugging Face folder (safetensors shards). Then each mode runs
under torchrun with --ranks processes. Every rank builds the debug speech config's model on that tower through
recipes/train.py (`model_for`; the debug speech part is small beside the tower) in --dtype (float32: what `dtype:
auto` trains in on a CPU; the files hold bf16), places it with FSDP2 (`place`), fills its shards when loading row by
row, checks its shards against the file, and reports its peak RSS (ru_maxrss: file pages mapped in count too) and
its RSS after imports.

Usage: python benchmarks/shard_load.py [--ranks 4] [--format meta|hf]
Last line (JSON): per-rank peak RSS for both modes, the tower's size and largest tensor, the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mm_llama.llama import Transformer, get_preset, save_meta
from mm_llama.llama.format_hf import meta_to_hf_key, permute_meta_to_hf

ROOT = Path(__file__).resolve().parents[1]

RANK = r"""
import json, os, resource, sys, torch
import torch.distributed as dist
from mm_llama.engine.dist import init_distributed
from mm_llama.engine.parallelize import place
from mm_llama.llama.slices import fill_sharded
from mm_llama.recipes.train import load_train_config, model_for, sharded_rows
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
info = init_distributed(device="cpu")
dtype = sys.argv[4]
cfg = load_train_config("debug_speech", [f"tower.path={sys.argv[1]}", "parallel.tower=fsdp", f"dtype={dtype}"])
base = rss()
rows = sharded_rows(cfg) if sys.argv[2] == "rows" else None
model = model_for(cfg, getattr(torch, dtype), rows)
place(model, info, cfg.parallel, activation_checkpointing=False)
read = fill_sharded(model.tower, rows) if rows is not None else None
w = model.tower.layers[3].feed_forward.w1.weight  # spot check against the file: this rank's rows
full = w.full_tensor()
local = float(w.to_local().float().sum())
out = {"rank": info.rank, "base": base, "peak": rss(), "read": read, "w1_sum": float(full.float().sum())}
open(f"{sys.argv[3]}/rank{info.rank}.json", "w").write(json.dumps(out | {"local_sum": local}))
dist.barrier()
dist.destroy_process_group()
"""


def write_tower(folder: Path, fmt: str) -> dict:
    """A random ~1.1B-parameter tower (bf16) as a Meta or HF folder, made once."""
    args = get_preset("debug").replace(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192, vocab_size=32000, head_dim=None
    )
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tower = Transformer(args).to(torch.bfloat16)
    tower.init_weights(std=0.02)
    if fmt == "meta":
        save_meta(tower, folder)
    else:
        hf = {}
        for k, v in tower.state_dict().items():
            if k.endswith("attention.wq.weight"):
                v = permute_meta_to_hf(v, args.n_heads)
            elif k.endswith("attention.wk.weight"):
                v = permute_meta_to_hf(v, args.n_kv_heads)
            hf[meta_to_hf_key(k)] = v.contiguous()
        names = sorted(hf)
        half = len(names) // 2
        for i, part in enumerate((names[:half], names[half:])):
            save_file({n: hf[n] for n in part}, str(folder / f"model-{i + 1:05d}-of-00002.safetensors"))
        (folder / "config.json").write_text(json.dumps(hf_config(args)))
    sizes = [p.numel() * p.element_size() for p in tower.parameters()]
    info = {"tower_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "format": fmt}
    done.write_text(json.dumps(info))
    return info


def hf_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    }


def run_mode(folder: Path, mode: str, ranks: int, port: int, dtype: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port)]
    script = folder.parent / "rank.py"
    script.write_text(RANK)
    outs = Path(tempfile.mkdtemp(prefix=f"shard_load_{mode}_"))
    r = subprocess.run(
        [*cmd, str(script), str(folder), mode, str(outs), dtype], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if r.returncode:
        raise RuntimeError(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return [json.loads((outs / f"rank{i}.json").read_text()) for i in range(ranks)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--format", choices=["meta", "hf"], default="meta")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mm_llama_shard_load"))
    args = ap.parse_args()
    folder = Path(args.work) / args.format
    tower = write_tower(folder, args.format)
    gb = 1e9
    big = tower["largest_tensor_bytes"] / gb
    print(f"tower: {tower['tower_bytes'] / gb:.2f} GB ({args.format}), largest tensor {big:.3f} GB")
    out = {"ranks": args.ranks, "dtype": args.dtype, **tower, "cpu": platform.processor() or platform.machine()}
    for i, mode in enumerate(("whole", "rows")):
        res = run_mode(folder, mode, args.ranks, 29700 + i, args.dtype)
        if len({round(r["w1_sum"], 2) for r in res}) != 1:
            raise RuntimeError(f"{mode}: the ranks' shards disagree")
        peaks = [r["peak"] / gb for r in res]
        added = [(r["peak"] - r["base"]) / gb for r in res]
        out[mode] = {
            "peak_gb": [round(p, 3) for p in peaks],
            "added_gb": [round(a, 3) for a in added],
            "w1_sum": res[0]["w1_sum"],
            "read_gb": [round((r["read"] or 0) / gb, 3) for r in res],
        }
        shown = ", ".join(f"{p:.2f}" for p in peaks)
        print(f"{mode:>5}: peak RSS per rank {shown} GB (added: {', '.join(f'{a:.2f}' for a in added)} GB)")
    if out["whole"]["w1_sum"] != out["rows"]["w1_sum"]:
        raise RuntimeError("the tower read row by row differs from the tower read whole")
    out["peak_ratio_rows_vs_whole"] = round(
        statistics.median(out["rows"]["peak_gb"]) / statistics.median(out["whole"]["peak_gb"]), 3
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
