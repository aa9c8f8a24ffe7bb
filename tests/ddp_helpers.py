"""Worker functions for the multi-process DDP tests (importable by spawned children)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh

from mm_llama.engine import DistributedDataParallel, exit_process
from mm_llama.engine.shard import resident_bytes, shard_frozen
from mm_llama.llama import Transformer, get_preset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


class AdapterNet(nn.Module):
    """A frozen trunk with trainable adapters interleaved, a tied embedding/output and an optional branch."""

    def __init__(self, dim=32, vocab=50, layers=4, dtype=torch.float32, never_used=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.trunk = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(layers)
        )
        self.branch = nn.Linear(dim, dim)  # modality-conditional adapter
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied / shared parameter
        self.never = nn.Linear(dim, dim) if never_used else None
        self.trunk.requires_grad_(False)  # the frozen tower
        self.to(dtype)

    def forward(self, tokens, use_branch: bool = True):
        h = self.emb(tokens)
        for t, a in zip(self.trunk, self.adapters):
            h = torch.tanh(t(h)) + a(h)
        if use_branch:
            h = h + self.branch(h)
        return self.out(h)


def batch(rank: int, step: int, micro: int, vocab=50, bsz=4, seq=8):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randint(0, vocab, (bsz, seq), generator=g)
    y = torch.randint(0, vocab, (bsz, seq), generator=g)
    return x, y


def train_pair(rank: int, world: int, port: int, cfg: dict) -> None:
    """Train the same model with torch DDP and ours; compare grads and parameters after every step."""
    setup(rank, world, port)
    dtype = cfg.get("dtype", torch.float32)
    torch.manual_seed(0)
    base = AdapterNet(dtype=dtype, never_used=cfg.get("never_used", False))
    ours_m, ref_m = copy.deepcopy(base), copy.deepcopy(base)
    find_unused = cfg.get("find_unused", False)
    kw = dict(bucket_cap_mb=cfg.get("cap_mb", 0.01), gradient_as_bucket_view=cfg.get("as_view", True))
    ours = DistributedDataParallel(
        ours_m,
        first_bucket_cap_mb=cfg.get("first_mb", 0.002),
        find_unused_parameters=find_unused,
        comm_hook=cfg.get("hook"),
        **kw,
    )
    ref = nn.parallel.DistributedDataParallel(ref_m, find_unused_parameters=find_unused, **kw)
    if cfg.get("hook") == "fp16":
        ref.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.get("hook") == "bf16":
        ref.register_comm_hook(None, default_hooks.bf16_compress_hook)
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9) for m in (ours_m, ref_m)
    ]
    accum = cfg.get("accum", 1)
    exact = world == 2 and cfg.get("exact", True)
    for step in range(cfg.get("steps", 4)):
        for model in (ours, ref):
            for micro in range(accum):
                x, y = batch(rank, step, micro)
                use_branch = cfg.get("branch_rule", lambda r, s: True)(rank, step)
                ctx = model.no_sync() if micro < accum - 1 else contextlib.nullcontext()
                with ctx:
                    logits = model(x, use_branch=use_branch)
                    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    loss.backward()
        for (n, p1), (_, p2) in zip(ours_m.named_parameters(), ref_m.named_parameters()):
            g1, g2 = p1.grad, p2.grad
            assert (g1 is None) == (g2 is None), f"step {step} {n}: grad None mismatch ({g1 is None} vs {g2 is None})"
            if g1 is not None:
                _compare(g1, g2, exact, f"grad step {step} {n}")
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (n, p1), (_, p2) in zip(ours_m.named_parameters(), ref_m.named_parameters()):
            _compare(p1, p2, exact, f"param step {step} {n}")
    finish()


def finish() -> None:
    """End a spawned worker whose checks all passed (see mm_llama.engine.exit_process)."""
    exit_process(0)


def _compare(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), f"{what}: max diff {(a.float() - b.float()).abs().max().item()}"
    else:
        # summation order depends on the bucket layout above 2 ranks (pytorch #49966): rtol 1e-6, with an
        # absolute floor relative to the tensor's scale for entries near zero
        tol = 1e-6 if a.dtype == torch.float32 else 1e-2
        atol = tol * b.float().abs().max().item()
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=atol), (
            f"{what}: max diff {(a.float() - b.float()).abs().max().item()}"
        )


def unused_param_error(rank: int, world: int, port: int, who_skips: str) -> None:
    setup(rank, world, port, timeout_s=30)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(AdapterNet(), bucket_cap_mb=0.01, first_bucket_cap_mb=0.002)
    x, y = batch(rank, 0, 0)
    skip = who_skips == "all" or (who_skips == "rank1" and rank == 1)
    loss = nn.functional.cross_entropy(ddp(x, use_branch=not skip).flatten(0, 1), y.flatten())
    if skip:
        try:
            loss.backward()
        except RuntimeError as e:
            assert "branch.weight" in str(e) and "branch.bias" in str(e) and "find_unused_parameters" in str(e), e
        else:
            raise AssertionError("expected an error naming the unused parameters")
    else:
        loss.backward()  # completes: the skipping rank still reduced its buckets
        assert ddp.module.branch.weight.grad is not None
    dist.barrier()
    finish()


def mismatch_error(rank: int, world: int, port: int) -> None:
    setup(rank, world, port, timeout_s=30)
    model = AdapterNet(dim=32 if rank == 0 else 32)
    if rank == 1:
        model.branch = nn.Linear(32, 16)
    try:
        DistributedDataParallel(model)
    except RuntimeError as e:
        msg = str(e)
        assert "branch.weight" in msg and "rank 0" in msg and "rank 1" in msg and "(16, 32)" in msg, msg
    else:
        raise AssertionError("expected a mismatch error")
    finish()


def broadcast_check(rank: int, world: int, port: int) -> None:
    """Trainable params come from rank 0; frozen ones are NOT broadcast (each rank loads its own)."""
    setup(rank, world, port)
    torch.manual_seed(rank)  # different init per rank on purpose
    model = AdapterNet()
    frozen_before = model.trunk[0].weight.detach().clone()
    DistributedDataParallel(model)
    for p in (model.adapters[0][0].weight, model.emb.weight):
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p.detach())
        assert all(torch.equal(g, gathered[0]) for g in gathered)
    assert torch.equal(model.trunk[0].weight, frozen_before)
    finish()


class TiedTowerWithAdapter(nn.Module):
    """A debug Llama tower with TIED embeddings (frozen) and a trainable adapter between its input rows and layers."""

    def __init__(self):
        super().__init__()

        torch.manual_seed(0)
        self.tower = Transformer(get_preset("debug").replace(tie_embeddings=True))
        self.tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
        self.tower.requires_grad_(False)
        self.adapter = nn.Linear(self.tower.args.dim, self.tower.args.dim)

    def forward(self, tokens):
        h = self.tower.tok_embeddings(tokens)
        h = h + torch.tanh(self.adapter(h))
        return self.tower(embeds=h)


def sharded_tied_tower(rank: int, world: int, port: int, out) -> None:
    """Loss and adapter gradient with the tied tower sharded by FSDP2 (each rank the whole batch) == unsharded."""

    setup(rank, world, port)

    ref, model = TiedTowerWithAdapter(), TiedTowerWithAdapter()
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_loss = ref(tokens).pow(2).mean()
    ref_loss.backward()
    tower = model.tower
    try:
        shard_frozen(model, [tower.layers[0]], init_device_mesh("cpu", (world,)), leave=set())
        out[f"error{rank}"] = ""
    except ValueError as e:  # the adapter is trainable and not left out
        out[f"error{rank}"] = str(e)
    model = TiedTowerWithAdapter()
    tower = model.tower
    shard_frozen(
        model,
        [*tower.layers, [tower.tok_embeddings, tower.output]],
        init_device_mesh("cpu", (world,)),
        leave=set(model.adapter.parameters()),
    )
    for _ in range(2):  # twice: the units are gathered again on the second step
        model.adapter.weight.grad = None
        loss = model(tokens).pow(2).mean()
        loss.backward()
    out[f"loss{rank}"] = (float(loss), float(ref_loss))
    out[f"grad{rank}"] = float((model.adapter.weight.grad - ref.adapter.weight.grad).abs().max())
    out[f"fraction{rank}"] = resident_bytes(tower).fraction
    dist.destroy_process_group()
