"""Fault injection: damaged checkpoints, a bad resume path, and a rank killed while a checkpoint is being saved.
After every fault, `resume=auto` continues from the newest intact checkpoint and the loss curve equals an
uninterrupted run's (no intact checkpoint at all: an error, not a restart); nothing of the run is overwritten
before the resume decision."""

import errno
import shutil

import pytest
import torch

from mm_llama.engine.checkpoint import save_checkpoint, verify_checkpoint
from mm_llama.llama.errors import CheckpointError
from tests.integration.test_train import BIN, FAULTS, _port, train

CFG = "recipes/configs/debug_speech.yaml"
ARGS = ["steps=6", "ckpt_every=2", "keep_last=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("ref")
    losses, _ = train("--config", CFG, f"run_dir={run}", *ARGS)
    return run, losses


def damage(ckpt, kind):
    if kind == "adapter_deleted":
        (ckpt / "adapter.safetensors").unlink()
    elif kind == "adapter_truncated":
        data = (ckpt / "adapter.safetensors").read_bytes()
        (ckpt / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "train_state_truncated":
        data = (ckpt / "train_state.pt").read_bytes()
        (ckpt / "train_state.pt").write_bytes(data[:100])
    elif kind == "cursor_deleted":
        (ckpt / "data_rank0.json").unlink()
    elif kind == "cursor_garbage":
        (ckpt / "data_rank0.json").write_text("{not json")
    elif kind == "manifest_deleted":
        (ckpt / "manifest.json").unlink()
    elif kind == "bitflip":
        p = ckpt / "adapter.safetensors"
        data = bytearray(p.read_bytes())
        data[-5] ^= 0xFF
        p.write_bytes(bytes(data))


KINDS = [
    "adapter_deleted",
    "adapter_truncated",
    "train_state_truncated",
    "cursor_deleted",
    "cursor_garbage",
    "manifest_deleted",
    "bitflip",
]


def test_every_kind_of_damage_is_found(reference, tmp_path):
    """Each damage makes the checkpoint fail verification, naming the file (the resumes below run three of them)."""
    ref_run, _ = reference
    for kind in KINDS:
        ckpt = tmp_path / kind
        shutil.copytree(ref_run / "checkpoints" / "step_00000006", ckpt)
        damage(ckpt, kind)
        problem = verify_checkpoint(ckpt)
        assert problem is not None and str(ckpt) in problem, kind


@pytest.mark.parametrize("kind", ["adapter_truncated", "cursor_garbage", "manifest_deleted"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(reference, tmp_path, kind):
    ref_run, ref_losses = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    config_before = (run / "config.yaml").read_bytes()
    damage(run / "checkpoints" / "step_00000006", kind)
    losses, r = train("--config", CFG, f"run_dir={run}", *ARGS)
    assert "resume: skipped" in r.stderr and "step_00000006" in r.stderr, r.stderr[-2000:]
    assert "resume: from" in r.stderr and "step_00000004" in r.stderr
    assert losses == ref_losses  # steps 5-6 redone from step 4: the same curve, bitwise on CPU
    assert (run / "config.yaml").read_bytes() == config_before  # the run's config is not overwritten


def test_every_checkpoint_damaged_is_an_error_not_a_restart(reference, tmp_path):
    ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for step, kind in zip((2, 4, 6), ("adapter_truncated", "cursor_garbage", "manifest_deleted")):
        damage(run / "checkpoints" / f"step_{step:08d}", kind)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock")
    _, r = train("--config", CFG, f"run_dir={run}", *ARGS, check=False)
    assert r.returncode == 2 and r.stderr.count("resume: skipped") == 3 and "no intact checkpoint" in r.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock") == before


@pytest.mark.parametrize("kind", ["missing", "damaged"])
def test_explicit_bad_resume_path_is_a_clear_error(reference, tmp_path, kind):
    ref_run, _ = reference
    if kind == "missing":
        path = tmp_path / "nonexistent"
    else:
        shutil.copytree(ref_run / "checkpoints" / "step_00000004", tmp_path / "ck")
        damage(tmp_path / "ck", "adapter_truncated")
        path = tmp_path / "ck"
    run = tmp_path / "run"
    _, r = train("--config", CFG, f"run_dir={run}", *ARGS, f"resume={path}", check=False)
    assert r.returncode == 2 and "checkpoint error" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr and not run.exists()


def test_rank_killed_during_a_checkpoint_save_then_resume(tmp_path):
    """2 ranks; rank 1 is killed while step 4's checkpoint is being written: step 4 never becomes a checkpoint,
    the other rank exits with an error, and resume=auto continues from step 2 to the uninterrupted curve."""

    def launcher():
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port())]

    ref, _ = train("--config", CFG, f"run_dir={tmp_path / 'ref'}", *ARGS, launcher=launcher())
    run = tmp_path / "run"
    _, r = train(
        "--config",
        CFG,
        f"run_dir={run}",
        *ARGS,
        "--kill-rank",
        "1",
        "--kill-step",
        "4",
        "--kill-in",
        "save",
        launcher=launcher(),
        check=False,
        script=FAULTS,
    )
    assert r.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    losses, r = train("--config", CFG, f"run_dir={run}", *ARGS, launcher=launcher())
    assert "step_00000002" in r.stderr and losses == ref


def test_a_checkpoint_write_that_fails_leaves_no_partial_folder(tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: one error naming the file, no `.tmp_step` folder left, the
    previous checkpoint still the newest."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(weights=dict(model.state_dict()), optimizer_state=opt.state_dict(), scheduler=sched, extra={})
    kw |= dict(data_states={}, rank=0)
    save_checkpoint(tmp_path, 2, **kw, is_main=True)

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="train_state.pt: cannot write the checkpoint .No space left"):
        save_checkpoint(tmp_path, 4, **kw, is_main=True)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
