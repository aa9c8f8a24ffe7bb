"""Elastic resume and the run folder's guards (mm_llama/engine/resume.py), through the recipe's entry point.

A run trained with the global stream (`data.split=interleave`) resumes on another number of processes with the
global batch kept (data.batch_size x ranks x optim.grad_accum): its losses equal the uninterrupted run's (rel 1e-5,
fp32), 2 ranks -> 1 and 1 -> 2, with the tower replicated and sharded (`parallel.tower=fsdp`). What cannot be
resumed exactly is an error (exit 2) naming the checkpoint and what differs, and nothing in the folder changes."""

import json
import shutil

import pytest
import yaml

from mm_llama.engine.checkpoint import write_manifest
from mm_llama.engine.resume import RunLock
from tests.integration.test_train import BIN, _port, train

CFG = "recipes/configs/debug_speech.yaml"
ARGS = ["--config", CFG, "steps=6", "ckpt_every=2", "keep_last=3", "data.split=interleave"]


def _torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(_port())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 6-step runs with checkpoints at 2, 4, 6: 1 rank x batch 4 and 2 ranks x batch 2 (the same
    global batches of the one stream)."""
    root = tmp_path_factory.mktemp("elastic")
    one, _ = train(*ARGS, f"run_dir={root / 'one'}", "data.batch_size=4")
    two, _ = train(*ARGS, f"run_dir={root / 'two'}", "data.batch_size=2", launcher=_torchrun(2))
    assert two == pytest.approx(one, rel=1e-5)  # 2 ranks x 2 == 1 rank x 4
    return root, {1: one, 2: two}


def _from(runs, world: int, step: int, dest):
    """A run folder holding only the `world`-rank run's config and its checkpoint at `step` (as if pre-empted
    there)."""
    root, _ = runs
    src = root / ("one" if world == 1 else "two")
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    shutil.copytree(src / "checkpoints" / f"step_{step:08d}", dest / "checkpoints" / f"step_{step:08d}")
    return dest


def _snapshot(folder):
    """Every file's bytes but the lock's (which records the last run that took the folder)."""
    return {
        p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize(
    "saved, step, now, layout",
    [
        (2, 2, 1, ["data.batch_size=4"]),
        (2, 4, 1, ["data.batch_size=2", "optim.grad_accum=2", "parallel.tower=fsdp"]),
        (1, 2, 2, ["data.batch_size=2"]),
        (1, 4, 2, ["data.batch_size=2", "parallel.tower=fsdp"]),
    ],
    ids=["2to1", "2to1-fsdp-accum", "1to2", "1to2-fsdp"],
)
def test_resume_on_another_world_size_gives_the_uninterrupted_losses(runs, tmp_path, saved, step, now, layout):
    run = _from(runs, saved, step, tmp_path / "run")
    losses, r = train(*ARGS, f"run_dir={run}", *layout, launcher=_torchrun(now) if now > 1 else None)
    assert f"resume: from {run / 'checkpoints' / f'step_{step:08d}'}" in r.stderr
    # accumulated micro-batches add the gradients in another order: within fp32 rounding
    assert losses == pytest.approx(runs[1][saved], rel=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000006"


def _refused(run, *extra, contains):
    before = _snapshot(run) if run.exists() else None
    _, r = train(*ARGS, f"run_dir={run}", *extra, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for text in contains:
        assert text in r.stderr, r.stderr[-3000:]
    assert (_snapshot(run) if run.exists() else None) == before  # nothing written, nothing overwritten
    return r.stderr


def test_what_cannot_be_resumed_exactly_is_an_error_that_says_what_to_set(runs, tmp_path):
    ckpt = "step_00000002"
    # another global batch: 2 ranks x 2 saved, 1 rank x 2 now
    run = _from(runs, 2, 2, tmp_path / "batch")
    _refused(run, "data.batch_size=2", contains=[ckpt, "global batch", "data.batch_size=4", "optim.grad_accum=2"])
    # a run that reads its own shards per rank resumes on its own world size only
    run = _from(runs, 2, 2, tmp_path / "shards")
    for f in (run / "config.yaml", run / "checkpoints" / ckpt / "config.yaml"):
        f.write_text(f.read_text().replace("split: interleave", "split: shards"))
    write_manifest(run / "checkpoints" / ckpt, 2, 2)
    _refused(run, "data.split=shards", "data.batch_size=4", contains=[ckpt, "data.split=shards", "2 ranks"])
    # a key that defines the run changed (the seed: another data order), or nothing left to train
    run = _from(runs, 1, 4, tmp_path / "seed")
    _refused(run, "seed=5", "data.batch_size=4", contains=["step_00000004", "seed: 0 -> 5"])
    _refused(run, "model.modality=image", "data.batch_size=4", contains=["model.modality: 'speech' -> 'image'"])
    _refused(run, "steps=3", "data.batch_size=4", contains=["at step 4 and steps=3", "nothing to train"])


def test_a_run_folder_is_never_restarted_over_or_shared(runs, tmp_path):
    root, _ = runs
    # every checkpoint damaged: an error listing them, not a restart from step 0 over the old files
    run = tmp_path / "damaged"
    shutil.copytree(root / "one", run)
    for d in (run / "checkpoints").iterdir():
        (d / "adapter.safetensors").write_bytes(b"x")
    _refused(run, "data.batch_size=4", contains=["no intact checkpoint", "resume: skipped"])
    # a run that left no checkpoint, and resume=none on a folder that holds a run
    run = tmp_path / "nockpt"
    run.mkdir()
    shutil.copy(root / "one" / "config.yaml", run / "config.yaml")
    _refused(run, "data.batch_size=4", contains=["left no checkpoint", "config.yaml"])
    _refused(root / "one", "data.batch_size=4", "resume=none", contains=["already holds a run"])
    # a second run on a folder another run owns is refused, naming the owner
    lock = RunLock(tmp_path / "owned")
    lock.acquire()
    try:
        _refused(tmp_path / "owned", "data.batch_size=4", contains=["is in use by pid", "one run per folder"])
    finally:
        lock.release()
    # a run_dir that is a file; a start that fails once the model is built leaves no folder behind
    (tmp_path / "afile").write_text("mine")
    _refused(tmp_path / "afile", contains=["a file, not a folder"])
    assert (tmp_path / "afile").read_text() == "mine"
    image = ["--config", "recipes/configs/debug_image.yaml"]
    _, r = train(*image, f"run_dir={tmp_path / 'aux'}", "objective=aux", check=False)
    assert r.returncode != 0 and not (tmp_path / "aux").exists(), r.stderr[-2000:]


def test_the_resumed_config_must_be_readable(runs, tmp_path):
    run = _from(runs, 1, 2, tmp_path / "run")
    (run / "checkpoints" / "step_00000002" / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    write_manifest(run / "checkpoints" / "step_00000002", 2, 1)
    _refused(run, "data.batch_size=4", contains=["step_00000002", "(absent)"])


def test_evaluation_in_the_loop_logs_held_out_figures_and_keeps_the_best_adapter(runs, tmp_path):
    """eval.every=3: eval_loss and the plug-in's metric (speech: eval_wer, eval_cer) at steps 3 and 6 in
    metrics.jsonl, with their cost; ckpt.keep_best=eval_wer keeps the best adapter beside the last; the training
    losses are those of the run without evaluation."""
    run = tmp_path / "run"
    held_out = ["eval.every=3", "eval.data=tests/assets/shards/audio/index.json", "eval.samples=4"]
    held_out += ["eval.max_new_tokens=8", "ckpt.keep_best=eval_wer"]
    losses, _ = train(*ARGS, f"run_dir={run}", "data.batch_size=4", *held_out)
    assert losses == runs[1][1]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_wer" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("loss" in r for r in recs)
    assert all({"eval_loss", "eval_cer", "eval_seconds"} <= set(r) and r["eval_samples"] == 4 for r in evals)
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "eval_wer" and best["value"] == min(r["eval_wer"] for r in evals)
    assert (run / "adapter.best.safetensors").is_file() and (run / "adapter.safetensors").is_file()
    _, r = train(*ARGS, f"run_dir={tmp_path / 'bad'}", "ckpt.keep_best=eval_wer", check=False)
    assert r.returncode == 2 and "eval.every > 0" in r.stderr
