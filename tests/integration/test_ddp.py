"""Our DDP engine vs torch's DistributedDataParallel (gloo, spawned processes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm_llama.engine import DistributedDataParallel, compute_bucket_assignment_by_size, plan_buckets
from mm_llama.engine.buckets import auto_bucket_caps
from tests import ddp_helpers as H


def spawn(fn, world, *args):
    mp.spawn(fn, args=(world, H.free_port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("plain", {}),
        ("accumulate_no_sync", {"accum": 3}),
        ("no_bucket_view", {"as_view": False, "accum": 2}),
        ("one_big_bucket", {"cap_mb": 25, "first_mb": 1}),
        ("bf16_params", {"dtype": torch.bfloat16}),
        ("find_unused_rank1_skips", {"find_unused": True, "branch_rule": "rank1_skips", "never_used": True}),
        ("find_unused_accumulate", {"find_unused": True, "branch_rule": "alternate", "accum": 2}),
        ("fp16_hook", {"hook": "fp16"}),
        ("bf16_hook", {"hook": "bf16"}),
    ],
)
def test_matches_torch_ddp_world2(name, cfg):
    spawn(H.train_pair, 2, _resolve(cfg))


@pytest.mark.parametrize(
    "cfg",
    [{"accum": 2}, {"find_unused": True, "branch_rule": "rank1_skips", "never_used": True}],
    ids=["accumulate", "find_unused"],
)
def test_matches_torch_ddp_world4(cfg):
    spawn(H.train_pair, 4, _resolve(cfg))


def _resolve(cfg):
    rules = {"rank1_skips": rank1_skips, "alternate": alternate}
    cfg = dict(cfg)
    if "branch_rule" in cfg:
        cfg["branch_rule"] = rules[cfg["branch_rule"]]
    return cfg


def rank1_skips(rank, step):
    return rank != 1


def alternate(rank, step):
    return (rank + step) % 2 == 0


def test_unused_parameter_error_all_ranks():
    spawn(H.unused_param_error, 2, "all")


def test_unused_parameter_error_one_rank_no_hang():
    spawn(H.unused_param_error, 2, "rank1")


def test_mismatched_models_error():
    spawn(H.mismatch_error, 2)


def test_broadcast_trainable_only():
    spawn(H.broadcast_check, 2)


def test_bucket_assignment_equals_torch():
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        n = int(torch.randint(1, 25, (1,), generator=g))
        sizes = [int(s) for s in torch.randint(1, 400_000, (n,), generator=g)]
        dtypes = [torch.float32 if (trial % 2 == 0 or s % 3) else torch.bfloat16 for s in sizes]
        ts = [torch.empty(s, dtype=d) for s, d in zip(sizes, dtypes)]
        limits = [[1 << 20, 25 << 20], [1 << 18, 1 << 20], [25 << 20]][trial % 3]
        want = dist._compute_bucket_assignment_by_size(ts, limits, [False] * n)
        assert compute_bucket_assignment_by_size(ts, limits) == (list(want[0]), list(want[1]))
        if len(set(dtypes)) == 1:  # an explicit (gradient-ready) order: tensors permuted + their labels
            order = torch.randperm(n, generator=g).tolist()
            want = dist._compute_bucket_assignment_by_size([ts[i] for i in order], limits, [False] * n, order)
            got = compute_bucket_assignment_by_size([ts[i] for i in order], limits, order)
            assert got == (list(want[0]), list(want[1]))


def test_default_plan_reverse_registration_with_caps():
    params = [torch.empty(100_000) for _ in range(10)]  # 400 kB each
    plan = plan_buckets(params, bucket_cap_bytes=1 << 20, first_bucket_cap_bytes=1 << 19)
    assert plan[0] == [9, 8]  # first bucket closes once >= 512 KiB
    assert plan[1] == [7, 6, 5]
    assert sorted(i for b in plan for i in b) == list(range(10))


def test_auto_bucket_caps_follow_the_trainable_gradient_size():
    mib = 1 << 20
    assert auto_bucket_caps([torch.empty(8 * mib // 4)]) == (mib, mib)  # small: 1 MiB floor
    assert auto_bucket_caps([torch.empty(40 * mib // 4) for _ in range(4)]) == (5 * mib, mib)  # 160 MiB / 32
    assert auto_bucket_caps([torch.empty(400 * mib // 4) for _ in range(4)]) == (25 * mib, mib)  # torch's cap above
    big = [torch.empty(40 * mib // 4) for _ in range(4)]
    assert auto_bucket_caps(big, comm_s=0.01) == (25 * mib, mib)  # a link that makes it cheap: torch's plan
    assert auto_bucket_caps(big, comm_s=1.0) == (5 * mib, mib)  # a slow one: small buckets, launched early
    model = H.AdapterNet()
    ddp = DistributedDataParallel(model)  # the default is "auto" (world size 1: no probe)
    assert ddp.comm_probe_s is None
    assert ddp.bucket_cap_bytes == mib and ddp.first_bucket_cap_bytes == mib
    ddp.remove_hooks()
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive number of MiB or 'auto'"):
        DistributedDataParallel(model, bucket_cap_mb="fast")


def test_world_size_one_same_code_path():
    torch.manual_seed(0)
    model = H.AdapterNet()
    ref = H.AdapterNet()
    ref.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01, first_bucket_cap_mb=0.002)
    assert ddp.world_size == 1
    names = {n for b in ddp.bucket_plan() for n in b}
    assert "module.trunk.0.weight" not in names and not any(n.startswith("trunk") for n in names)
    assert "emb.weight" in names and "out.weight" not in names  # shared parameter counted once
    x, y = H.batch(0, 0, 0)
    for m in (ddp, ref):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    for (n, p1), (_, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), n
        if p1.grad is not None:
            assert torch.equal(p1.grad, p2.grad), n
    # grads are views into the buckets
    b = ddp.buckets[ddp._bucket_of[0]].buffer
    p0 = ddp.params[0]
    assert p0.grad.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_world_size_one_unused_error_and_find_unused():
    model = H.AdapterNet(never_used=True)
    ddp = DistributedDataParallel(model)
    x, y = H.batch(0, 0, 0)
    with pytest.raises(RuntimeError, match=r"never\.weight, never\.bias"):
        torch.nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
    ddp = DistributedDataParallel(H.AdapterNet(never_used=True), find_unused_parameters=True)
    torch.nn.functional.cross_entropy(ddp(x, use_branch=False).flatten(0, 1), y.flatten()).backward()
    assert ddp.module.never.weight.grad is None and ddp.module.branch.weight.grad is None
    assert ddp.module.adapters[0][0].weight.grad is not None


def test_no_trainable_params_error():
    m = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        DistributedDataParallel(m)


def test_buckets_rebuilt_once_in_gradient_ready_order():
    torch.manual_seed(0)
    model = H.AdapterNet()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01, first_bucket_cap_mb=0.002)
    before = ddp.bucket_plan()
    x, y = H.batch(0, 0, 0)
    for step in range(3):
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
        if step == 0:
            order = [ddp.param_names[i] for i in ddp._ready_order]
    after = ddp.bucket_plan()
    assert ddp._rebuilt and sorted(sum(before, [])) == sorted(sum(after, []))
    assert sum(after, []) == order  # buckets now follow the observed ready order
    assert order[0] == "branch.weight" or order[0].startswith("branch")  # the last layer's grads come first
