"""mm_llama/engine/shard.py: FSDP2 units over a frozen tower with TIED embeddings (the embedding and output
projection one unit), the trainable adapter left replicated (gloo, spawned processes)."""

import torch.multiprocessing as mp

from tests import ddp_helpers as H


def test_tied_tower_sharded_equals_unsharded():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(H.sharded_tied_tower, args=(2, H.free_port(), out), nprocs=2, join=True)
        out = dict(out)
    for r in (0, 1):
        assert "trainable parameters would be sharded" in out[f"error{r}"] and "adapter.weight" in out[f"error{r}"]
        loss, ref = out[f"loss{r}"]
        assert abs(loss - ref) <= 1e-6 * abs(ref), (loss, ref)
        assert out[f"grad{r}"] < 1e-6
        assert 0.49 < out[f"fraction{r}"] < 0.51
