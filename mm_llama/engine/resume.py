"""Where a run starts, decided before anything of it is written: a new run folder, or the newest intact checkpoint
of the run in it, possibly on another number of processes (elastic resume).

- The run folder is locked while a run owns it (`RunLock`, an flock on RUN/.lock that the system releases when the
  process ends): a second run on the same folder is refused naming the owner.
- `resume=auto` in a folder with checkpoints takes the newest that verifies and names the ones it skipped; when none
  verifies it is an error, never a silent restart from step 0 over the old files. A folder that holds a run without
  a checkpoint (its config.yaml) is refused too, and so is `resume=none` on a folder that holds a run.
- A checkpoint resumes only a run that keeps the keys defining it (seed, model, data, ...: every key but
  `MAY_CHANGE`); the errors name the keys and both values. A run at or past `steps` has nothing to train.
- Another world size is resumed when the data order is global (`data.split=interleave`, data/loader.py) and the
  global batch (data.batch_size x ranks x optim.grad_accum) is kept; otherwise the error says what to set.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mm_llama.llama.errors import CheckpointError

from .checkpoint import DCP, MANIFEST, checkpoint_dirs, find_resumable, verify_checkpoint

# keys a resumed run may change: how long and how it runs, how it reports, and its layout (the global batch is
# checked on its own); every other key must equal the checkpoint's
MAY_CHANGE = {
    "steps",
    "run_dir",
    "resume",
    "stop_after",
    "log_every",
    "ckpt_every",
    "keep_last",
    "profile",
    "tensorboard",
    "progress_every_s",
    "peak_tflops",
    "engine",
    "bucket_cap_mb",
    "find_unused_parameters",
    "activation_checkpointing",
    "dtype",
    "data.batch_size",
    "data.num_workers",
    "optim.grad_accum",
    "optim.max_nonfinite",
}
MAY_CHANGE_SECTIONS = ("parallel.", "eval.", "ckpt.")
CONFIG = "config.yaml"  # the run's config, in the run folder and in each checkpoint


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Layout:
    """How a run spreads its global batch: ranks x data.batch_size x optim.grad_accum, and its data split."""

    world_size: int
    batch_size: int
    grad_accum: int
    split: str

    @classmethod
    def of(cls, config: dict, world_size: int) -> Layout:
        c = flat(config)
        batch, accum = int(c.get("data.batch_size", 1)), int(c.get("optim.grad_accum", 1))
        return cls(world_size, batch, accum, str(c.get("data.split", "shards")))

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    def describe(self) -> str:
        b, a = self.batch_size, self.grad_accum
        return f"{self.world_size} ranks x data.batch_size {b} x optim.grad_accum {a} = {self.global_batch}"


class RunLock:
    """Exclusive ownership of a run folder (rank 0 holds it). `acquire` creates the folder when needed (and says
    so: `created`) and refuses a folder another live run holds, naming its process and host."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.file, self.created = run_dir, None, False

    def acquire(self) -> None:
        run = self.run_dir
        if run.exists() and not run.is_dir():
            raise CheckpointError(f"run_dir={run}: a file, not a folder")
        try:
            self.created = not run.exists()
            run.mkdir(parents=True, exist_ok=True)
            f = (run / ".lock").open("a+")
        except OSError as e:
            raise CheckpointError(f"run_dir={run}: cannot be created or written ({e.strerror or e})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise CheckpointError(f"run_dir={run} is in use by {owner}: one run per folder") from None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n")
        f.flush()
        self.file = f

    def release(self, remove_created: bool = False) -> None:
        """Give the folder up; `remove_created`: a failed start removes the folder it created (nothing else is in
        it: the run writes only after its set-up succeeded)."""
        if self.file is None:
            return
        self.file.close()
        self.file = None
        lock = self.run_dir / ".lock"
        if remove_created and self.created and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
            lock.unlink()
            self.run_dir.rmdir()


def _saved_config(ckpt: Path) -> tuple[dict | None, Path | None]:
    """The config a checkpoint was trained with: its own copy, else (older checkpoints) its run folder's."""
    for f in (ckpt / CONFIG, ckpt.parent.parent / CONFIG):
        if f.is_file():
            try:
                return yaml.safe_load(f.read_text()) or {}, f
            except (OSError, yaml.YAMLError) as e:
                raise CheckpointError(f"{f}: unreadable ({e})") from None
    return None, None


def _changed_keys(saved: dict, now: dict) -> list[str]:
    a, b = flat(saved), flat(now)
    keys = sorted(set(a) | set(b))
    fixed = [k for k in keys if k not in MAY_CHANGE and not k.startswith(MAY_CHANGE_SECTIONS)]
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in fixed if a.get(k) != b.get(k)]


def _layout_advice(saved: Layout, now: Layout) -> str:
    """What to set so that this world size keeps the saved global batch."""
    B, W = saved.global_batch, now.world_size
    if B % W:
        return f"a global batch of {B} does not split over {W} ranks: resume with a world size that divides it"
    per_rank = B // W
    options = []
    if per_rank % now.grad_accum == 0:
        options.append(f"data.batch_size={per_rank // now.grad_accum}")
    if per_rank % now.batch_size == 0:
        options.append(f"optim.grad_accum={per_rank // now.batch_size}")
    return "set " + (" or ".join(options) or f"data.batch_size x optim.grad_accum = {per_rank}")


def check_compatible(ckpt: Path, config: dict, world_size: int, steps: int) -> None:
    """A CheckpointError unless the run `config` on `world_size` ranks can continue `ckpt` exactly."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    step, saved_world = int(manifest["step"]), int(manifest["world_size"])
    if step >= steps:
        raise CheckpointError(
            f"{ckpt}: the run is at step {step} and steps={steps}: nothing to train (raise steps to continue it, or "
            "give another run_dir for a new run)"
        )
    saved, source = _saved_config(ckpt)
    if saved is None:  # a checkpoint without any config: only the world size can be checked
        if saved_world != world_size:
            raise CheckpointError(f"{ckpt}: saved by {saved_world} ranks, this run has {world_size}")
        return
    changed = _changed_keys(saved, config)
    if changed:
        raise CheckpointError(
            f"{ckpt} was trained with other values ({source}): {'; '.join(changed)}. A resumed run keeps the keys "
            "that define it: change them back, or give another run_dir for a new run"
        )
    if saved_world == world_size:
        return
    was, now = Layout.of(saved, saved_world), Layout.of(config, world_size)
    if was.split != "interleave":
        raise CheckpointError(
            f"{ckpt}: saved by {saved_world} ranks with data.split={was.split} (each rank reads its own shards), this "
            f"run has {world_size}: resume with {saved_world} ranks (a run trained with data.split=interleave resumes "
            "on any number)"
        )
    if manifest.get("optimizer_shards") and manifest["optimizer_shards"] != DCP:  # per-rank files (before)
        raise CheckpointError(
            f"{ckpt}: its optimizer state is in {saved_world} per-rank files (written before version 0.2.0): "
            f"resume with {saved_world} ranks"
        )
    if was.global_batch != now.global_batch:
        raise CheckpointError(
            f"{ckpt}: saved with a global batch of {was.describe()}; this run has {now.describe()}: "
            f"{_layout_advice(was, now)}"
        )


def choose_checkpoint(resume: str, run_dir: Path, config: dict, world_size: int, steps: int) -> Path | None:
    """The checkpoint this run continues (None: a new run), printing what it skipped; a CheckpointError for every
    case where going on would lose or mix up a run (module docstring)."""
    if resume not in ("auto", "none", ""):
        problem = verify_checkpoint(resume)
        if problem:
            raise CheckpointError(f"resume={resume}: {problem}")
        ckpt = Path(resume)
    else:
        dirs = checkpoint_dirs(run_dir)
        held = dirs or (run_dir / CONFIG).exists()
        if resume != "auto":
            if held:
                raise CheckpointError(
                    f"resume=none: {run_dir} already holds a run (its {CONFIG} or checkpoints), which a new run "
                    "would overwrite: give another run_dir"
                )
            return None
        if not dirs:
            if held:
                left = [n for n in (CONFIG, "metrics.jsonl") if (run_dir / n).exists()]
                raise CheckpointError(
                    f"{run_dir} holds a run that left no checkpoint ({', '.join(left)}): a new run would overwrite "
                    "it; give another run_dir, or remove those files"
                )
            return None
        ckpt, skipped = find_resumable(run_dir)
        for why in skipped:
            print(f"resume: skipped {why}", file=sys.stderr, flush=True)
        if ckpt is None:
            raise CheckpointError(
                f"{run_dir}: no intact checkpoint to resume (all {len(dirs)} skipped, above); nothing was changed. "
                "Give another run_dir to start over, or resume=PATH"
            )
    check_compatible(ckpt, config, world_size, steps)
    print(f"resume: from {ckpt}", file=sys.stderr, flush=True)
    return ckpt
