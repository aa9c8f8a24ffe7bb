"""A small data-parallel training script for launcher tests (python | torchrun | accelerate launch).

Trains AdapterNet (frozen trunk + trainable adapters) with mm_llama's DDP engine on gloo/NCCL and prints one
`RESULT {...}` JSON line per rank. `--die-rank R --die-step S` makes rank R SIGKILL itself at step S.
"""

import argparse
import json
import os
import signal

import torch
from torch import nn

from mm_llama.engine import DistributedDataParallel, exit_process, init_distributed
from tests.ddp_helpers import AdapterNet, batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--die-step", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    torch.manual_seed(0)
    model = AdapterNet()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01, first_bucket_cap_mb=0.002)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(args.steps):
        if info.rank == args.die_rank and step == args.die_step:
            os.kill(os.getpid(), signal.SIGKILL)
        for micro in range(args.accum):
            x, y = batch(info.rank, step, micro)
            ctx = ddp.no_sync() if micro < args.accum - 1 else torch.enable_grad()
            with ctx:
                loss = nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
    checksum = sum(p.detach().double().sum().item() for p in model.parameters() if p.requires_grad)
    print(
        "RESULT " + json.dumps({"rank": info.rank, "world": info.world_size, "losses": losses, "checksum": checksum}),
        flush=True,
    )
    exit_process(0)


if __name__ == "__main__":
    main()
