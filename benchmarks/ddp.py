"""DDP engine benchmark: ours vs torch DDP vs a no-overlap baseline, CPU gloo, 2 processes, side by side.

Workload: an adapter-training-like model -- a frozen trunk of Linear layers with trainable adapter blocks
interleaved (tens of MB of trainable gradients). Each rank runs 1 thread; every figure is a median.

Reported:
  compute       forward + backward without any communication (T_fwd, T_backward)
  comm          all-reduce of all trainable gradients alone, in 25 MiB buckets (T_comm)
  ours / torch  full step (fwd + bwd + grads averaged) and the backward alone under DDP (T_step_backward), each
                with its DEFAULT bucket cap (ours: "auto", sized from the trainable gradients; torch: 25 MiB)
  no-overlap    local backward, then all-reduce of the gradient buckets after it
  hidden        (T_backward + T_comm - T_step_backward) / T_comm   -- share of communication hidden by backward
  sweeps        bucket cap 1/5/25/100 MiB; no_sync every 1/2/4 steps (time per micro-step)

The last line is JSON: default_hidden_fraction and default_vs_bound (ours at its default cap, on the slow link when
one is given, else loopback) and loopback_vs_torch (ours / torch DDP, each at its default, loopback).

Links: loopback by default; `--slow-link RATE` puts the two ranks in two network namespaces joined by a veth
pair shaped with `tc tbf` (needs root and iproute2); the namespaces are removed afterwards.

Usage: python benchmarks/ddp.py [--slow-link 1gbit] [--iters 7] [--layers 16] [--dim 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from mm_llama.engine import DistributedDataParallel
from mm_llama.engine.buckets import plan_buckets

MiB = 1 << 20


class FrozenTrunkWithAdapters(nn.Module):
    """Adapter training in miniature: a frozen trunk of `layers` Linear blocks, a trainable adapter (two Linears)
    before every 4th block counted from the top (the Llama 3 cross-attention schedule), and a few trainable rows
    added at the input (like the learnable `<|image|>` embeddings) so backward runs down to the bottom."""

    def __init__(self, dim: int, layers: int, every: int = 4):
        super().__init__()
        self.trunk = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers)).requires_grad_(False)
        self.schedule = list(range(layers))[::-1][::every][::-1]
        self.adapters = nn.ModuleDict(
            {str(i): nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) for i in self.schedule}
        )
        self.extra_rows = nn.Parameter(torch.zeros(8, dim))

    def forward(self, x):
        x = x + self.extra_rows.mean(0)
        for i, layer in enumerate(self.trunk):
            if str(i) in self.adapters:
                x = x + torch.tanh(self.adapters[str(i)](x))
            x = torch.relu(layer(x))
        return x


def interleaved(fns: dict, iters: int, warmup: int = 2) -> dict:
    """Median seconds of each timed callable (each returns its own duration), run round-robin: every round runs each
    once, so a noisy neighbour slows all of them alike. Every rank reports its medians; the slowest rank's count."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            dist.barrier()
            times[k].append(fn())
    t = torch.tensor([statistics.median(v) for v in times.values()])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(fns, t.tolist()))


def whole(fn):
    """`fn` as a timed callable for `interleaved`: returns the seconds the call took."""

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def median_time(fn, iters: int, warmup: int = 2) -> float:
    return interleaved({"fn": whole(fn)}, iters, warmup)["fn"]


def worker(args) -> None:
    # long: a benchmark reads top to bottom: set-up, each engine timed, the ratios
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = FrozenTrunkWithAdapters(args.dim, args.layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_mb = sum(p.numel() * 4 for p in trainable) / MiB
    x = torch.randn(args.batch, args.seq, args.dim, generator=torch.Generator().manual_seed(rank))
    res: dict = {"world": world, "trainable_grad_MiB": round(grad_mb, 1), "iters": args.iters}

    def zero(m):
        for p in m.parameters():
            p.grad = None

    def backward_only(wrapper, m):
        """loss.backward() alone (until grads are final, i.e. averaged under DDP); forward untimed."""

        def timed() -> float:
            zero(m)
            loss = wrapper(x).square().mean()
            dist.barrier()
            t0 = time.perf_counter()
            loss.backward()
            return time.perf_counter() - t0

        return timed

    def step_fn(ddp, m):
        def step():
            zero(m)
            ddp(x).square().mean().backward()

        return step

    # --- compute alone ----------------------------------------------------------------------
    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_bwd_local():
        zero(model)
        model(x).square().mean().backward()

    # --- communication alone (the same buckets torch's default plan would launch) -------------
    plan = plan_buckets(trainable, bucket_cap_bytes=25 * MiB, first_bucket_cap_bytes=1 * MiB)
    bufs = [torch.zeros(sum(trainable[i].numel() for i in b)) for b in plan]

    def comm():
        works = [dist.all_reduce(b, async_op=True) for b in bufs]
        for w in works:
            w.wait()

    # --- no-overlap baseline: backward, then reduce the buckets ------------------------------
    def no_overlap():
        zero(model)
        model(x).square().mean().backward()
        for b, idxs in zip(bufs, plan):
            torch.cat([trainable[i].grad.reshape(-1) for i in idxs], out=b).div_(world)
        comm()

    # --- ours vs torch DDP, each at its default cap; everything above interleaved round by round ----------
    m_ours, m_torch = copy.deepcopy(model), copy.deepcopy(model)
    ours = DistributedDataParallel(m_ours)  # the default: bucket_cap_mb="auto"
    res["auto_cap_MiB"] = ours.bucket_cap_bytes / MiB
    res["auto_buckets"] = len(ours.buckets)
    res["auto_probe_ms"] = ours.comm_probe_s * 1e3
    ref = nn.parallel.DistributedDataParallel(m_torch, broadcast_buffers=False)  # torch's default: 25 MiB
    res |= interleaved(
        {
            "T_fwd": whole(fwd),
            "T_compute": whole(fwd_bwd_local),
            "T_comm": whole(comm),
            "T_backward": backward_only(model, model),
            "T_step_no_overlap": whole(no_overlap),
            "T_step_ours": whole(step_fn(ours, m_ours)),
            "T_step_torch": whole(step_fn(ref, m_torch)),
            "T_step_backward_ours": backward_only(ours, m_ours),
            "T_step_backward_torch": backward_only(ref, m_torch),
        },
        args.iters,
    )
    ours.remove_hooks()
    del ref, ours, m_torch

    # --- bucket-cap sweep: ours at 1/5/25/100 MiB, torch at the same caps ------------------------
    for cap in (1, 5, 25, 100):
        ddp = DistributedDataParallel(m_ours, bucket_cap_mb=cap)
        m_t = copy.deepcopy(m_ours)
        ref = nn.parallel.DistributedDataParallel(m_t, bucket_cap_mb=cap, broadcast_buffers=False)
        fns = {
            "ours": whole(step_fn(ddp, m_ours)),
            "backward": backward_only(ddp, m_ours),
            "torch": whole(step_fn(ref, m_t)),
            "local": backward_only(model, model),
        }
        got = interleaved(fns, args.iters)
        res[f"cap_{cap}MiB"], res[f"torch_cap_{cap}MiB"] = got["ours"], got["torch"]
        # backward under DDP minus the local backward of the same rounds: the exposed communication
        res[f"cap_{cap}MiB_exposed"] = got["backward"] - got["local"]
        ddp.remove_hooks()
        del ref, m_t

    # --- no_sync every k steps (time per micro-step) -------------------------------------------
    ddp = DistributedDataParallel(m_ours, bucket_cap_mb=25)
    for k in (1, 2, 4):

        def accum_step(k=k):
            zero(m_ours)
            for micro in range(k):
                ctx = ddp.no_sync() if micro < k - 1 else contextlib.nullcontext()
                with ctx:
                    ddp(x).square().mean().backward()

        res[f"no_sync_every_{k}"] = median_time(accum_step, max(3, args.iters // k)) / k
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------


def sh(cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def slow_link(rate: str, delay: str):
    """Two namespaces mmbench0/1 joined by veth; both ends shaped with tbf. Yields per-rank command prefixes."""
    ns = ("mmbench0", "mmbench1")
    ips = ("10.231.0.1", "10.231.0.2")
    for n in ns:
        sh(f"ip netns del {n}", check=False)
    try:
        for n in ns:
            sh(f"ip netns add {n}")
            sh(f"ip -n {n} link set lo up")
        sh(f"ip link add mmb0 netns {ns[0]} type veth peer name mmb1 netns {ns[1]}")
        for i, n in enumerate(ns):
            dev = f"mmb{i}"
            sh(f"ip -n {n} addr add {ips[i]}/24 dev {dev}")
            sh(f"ip -n {n} link set {dev} up")
            sh(f"ip netns exec {n} tc qdisc add dev {dev} root tbf rate {rate} burst 256kb latency {delay}")
        yield [(f"ip netns exec {ns[i]}", f"mmb{i}", ips[0]) for i in range(2)]
    finally:
        for n in ns:
            sh(f"ip netns del {n}", check=False)


def launch(args, link: str) -> dict:
    port = 29400 + os.getpid() % 500
    base_env = {**os.environ, "WORLD_SIZE": "2", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    worker_args = [sys.executable, __file__, "--worker"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("iters", "layers", "dim", "batch", "seq")
    ]
    with slow_link(args.slow_link, args.delay) if link == "slow" else contextlib.nullcontext() as ns:
        procs = []
        for rank in range(2):
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
            cmd = list(worker_args)
            if ns is not None:
                prefix, dev, master = ns[rank]
                env.update(MASTER_ADDR=master, GLOO_SOCKET_IFNAME=dev)
                cmd = prefix.split() + cmd
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"benchmark worker failed ({link} link)")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:])


def report(res: dict, link: str) -> None:
    ms = lambda s: f"{s * 1e3:8.1f} ms"  # noqa: E731
    print(
        f"\n== {link} link | 2 ranks x 1 thread | trainable grads {res['trainable_grad_MiB']} MiB | "
        f"median of {res['iters']}"
    )
    print(f"compute fwd+bwd {ms(res['T_compute'])}  (fwd {ms(res['T_fwd'])}, backward {ms(res['T_backward'])})")
    print(f"comm alone      {ms(res['T_comm'])}")
    print(f"step no-overlap {ms(res['T_step_no_overlap'])}")
    print(f"step torch DDP  {ms(res['T_step_torch'])}")
    print(
        f"step ours       {ms(res['T_step_ours'])}   ratio ours/torch {res['T_step_ours'] / res['T_step_torch']:.3f}"
        f"   (ours: auto cap {res['auto_cap_MiB']:.2f} MiB, {res['auto_buckets']} buckets, link probe: all gradients "
        f"in {res['auto_probe_ms']:.0f} ms; torch: 25 MiB)"
    )
    bound = max(res["T_compute"], res["T_comm"] + res["T_fwd"])
    print(
        f"ours / max(compute, fwd+comm) = {res['T_step_ours'] / bound:.3f}   "
        f"ours / no-overlap = {res['T_step_ours'] / res['T_step_no_overlap']:.3f}"
    )
    hidden_of = {}
    for name in ("ours", "torch"):
        tsb = res[f"T_step_backward_{name}"]
        hidden = hidden_of[name] = (res["T_backward"] + res["T_comm"] - tsb) / res["T_comm"]
        print(f"hidden communication ({name:5s}): {100 * hidden:5.1f}%   (backward under DDP {ms(tsb)})")
    print("bucket cap sweep:   cap     ours step   torch step  ours/torch  hidden(ours)  ours/max(compute,fwd+comm)")
    for c in (1, 5, 25, 100):
        o, t = res[f"cap_{c}MiB"], res[f"torch_cap_{c}MiB"]
        hid = 1 - res[f"cap_{c}MiB_exposed"] / res["T_comm"]
        print(f"                 {c:4d} MiB {ms(o)}  {ms(t)}  {o / t:10.3f}  {100 * hid:10.1f}%  {o / bound:10.3f}")
    print("no_sync every k (per micro-step): " + "  ".join(f"k={k} {ms(res[f'no_sync_every_{k}'])}" for k in (1, 2, 4)))
    vs_torch = res["T_step_ours"] / res["T_step_torch"]
    return {"hidden": hidden_of["ours"], "vs_bound": res["T_step_ours"] / bound, "vs_torch": vs_torch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--layers", type=int, default=16, help="frozen trunk layers (an adapter before every 4th)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--slow-link", default=None, help="e.g. 1gbit: also run over a shaped veth link (root)")
    ap.add_argument("--delay", default="50ms", help="tbf latency for the slow link")
    ap.add_argument("--skip-loopback", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    figures = {}
    if not args.skip_loopback:
        loop = report(launch(args, "loopback"), "loopback")
        figures = {"default_hidden_fraction": loop["hidden"], "default_vs_bound": loop["vs_bound"]}
        figures["loopback_vs_torch"] = loop["vs_torch"]
    if args.slow_link:
        if os.geteuid() != 0:
            raise SystemExit("--slow-link needs root (network namespaces + tc)")
        slow = report(launch(args, "slow"), f"slow ({args.slow_link} veth + tbf)")
        figures.update(
            default_hidden_fraction=slow["hidden"],
            default_vs_bound=slow["vs_bound"],
            slow_vs_torch=slow["vs_torch"],
            link=args.slow_link,
        )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
