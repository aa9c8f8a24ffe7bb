"""Training checkpoints: trainable weights (safetensors) + optimizer + scheduler + RNG + step + data cursors.

Layout: RUN/checkpoints/step_00000010/{adapter.safetensors, train_state.pt, data_rank{r}.json, manifest.json}.
A checkpoint is written into a temporary folder; `manifest.json` (every file's size and sha256, the world size) is
written last, atomically, and the folder is then renamed into place, so a crash mid-save leaves the previous
checkpoint as the newest. Resuming verifies the manifest (`verify_checkpoint`); `find_resumable` takes the newest
checkpoint that verifies and says which newer ones it skipped and why. Only the last `keep` are kept. Loading uses
`torch.load(weights_only=True)`; a damaged file is a CheckpointError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler

from mm_llama.llama.errors import CheckpointError
from mm_llama.rng import py_rng_state_from_list, py_rng_state_to_list

_STEP_DIR = re.compile(r"step_(\d{8})$")


def _step_of(folder: Path) -> int | None:
    m = _STEP_DIR.search(folder.name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found, key=lambda sp: sp[0])]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(run_dir) if (d / "train_state.pt").is_file()]
    return dirs[-1] if dirs else None


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DCP = "dcp"  # the manifest's optimizer_shards for state saved with torch.distributed.checkpoint (any world size)


def write_manifest(folder: Path, step: int, world_size: int, optimizer_shards: bool | str = False) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "step": step,
        "world_size": world_size,
        "optimizer_shards": optimizer_shards,
        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint is complete and undamaged, else what is wrong with it. (Whether this run can continue
    it, on its world size and config, is engine/resume.py's question.)"""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: no such checkpoint folder"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, saved_world = manifest["files"], int(manifest["world_size"])
    except FileNotFoundError:
        return f"{path}: no {MANIFEST} (the save did not finish, or it predates manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / MANIFEST}: unreadable ({type(e).__name__}: {e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != want["size"]:
            return f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']} (truncated or replaced)"
        if _sha256(f) != want["sha256"]:
            return f"{f}: checksum differs from the manifest (damaged)"
    needed = ["adapter.safetensors", "train_state.pt"] + [f"data_rank{r}.json" for r in range(saved_world)]
    if manifest.get("optimizer_shards") == DCP:  # torch.distributed.checkpoint's metadata and each rank's file
        needed += [".metadata"] + [f"__{r}_0.distcp" for r in range(saved_world)]
    elif manifest.get("optimizer_shards"):  # checkpoints written before: one optimizer file per rank
        needed += [f"optimizer_rank{r}.pt" for r in range(saved_world)]
    absent = [n for n in needed if n not in files]
    return f"{path}: the manifest lacks {absent}" if absent else None


def find_resumable(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that verifies or None, why each newer one was skipped)."""
    skipped = []
    for d in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(d)
        if problem is None:
            return d, skipped
        skipped.append(problem)
    return None, skipped


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": py_rng_state_to_list(random.getstate())}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(py_rng_state_from_list(st["python"]))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler: LRScheduler,
    extra: dict[str, Any],
    data_states: dict,
    rank: int,
    is_main: bool,
    keep: int = 3,
    barrier: Callable[[], object] | None = None,
    world_size: int = 1,
    before_publish: Callable[[], None] | None = None,
    write_sharded: Callable[[Path], None] | None = None,
    config: dict | None = None,
) -> Path:
    """All ranks call this; rank-local data cursors go in data_rank{r}.json, the rest is written by rank 0, then the
    manifest, then the rename. `before_publish()` runs on every rank once its files are written (fault injection).
    `optimizer_state`: the optimizer's state keyed by parameter name (`optimizer_state_by_name`), which rank 0 keeps
    in train_state.pt; or `write_sharded(folder)` (adapters sharded with FSDP2): every rank writes it into the folder
    with torch.distributed.checkpoint (`save_sharded_optimizer`). `config`:
    the run's config, kept as config.yaml (a resume checks it). A failed write (a full disk) removes the partial
    folder: the previous checkpoint stays the newest, and the error names the file."""

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    with _cleaned_up_on_failure(tmp):
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if barrier:
            barrier()
        (tmp / f"data_rank{rank}.json").write_text(json.dumps(data_states))
        if write_sharded is not None:
            write_sharded(tmp)
        if before_publish is not None:
            before_publish()
        if barrier:
            barrier()
        if is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
            opt_state = optimizer_state if write_sharded is None else None
            sched = scheduler.state_dict()
            state = {"step": step, "optimizer": opt_state, "scheduler": sched, "rng": rng_state(), **extra}
            torch.save(state, tmp / "train_state.pt")
            if config is not None:
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            write_manifest(tmp, step, world_size, optimizer_shards=DCP if write_sharded is not None else False)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def load_checkpoint(path: str | Path, rank: int) -> tuple[dict, dict, list[dict]]:
    """(weights, train_state, the data cursors of every rank that saved it, in rank order); a missing or damaged
    file is a CheckpointError naming it."""

    path = Path(path)
    try:
        saved_world = int(json.loads((path / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({type(e).__name__}: {e})") from None
    cursors = [f"data_rank{r}.json" for r in range(saved_world)]
    parts = {}
    for name, read in (
        ("adapter.safetensors", lambda f: load_file(str(f))),
        ("train_state.pt", lambda f: torch.load(f, weights_only=True)),
        *((c, lambda f: json.loads(f.read_text())) for c in cursors),
    ):
        try:
            parts[name] = read(path / name)
        except Exception as e:  # noqa: BLE001 -- any failure to read a user's file becomes one named error
            raise CheckpointError(f"{path / name}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    state = parts["train_state.pt"]
    if state.get("optimizer") is None and (path / ".metadata").is_file():  # sharded adapters, any world size
        state["optimizer"] = DCP  # the trainer loads it into its own layout (`load_sharded_optimizer`)
    elif state.get("optimizer") is None:  # written before: this rank's optimizer state (the same world size)
        f = path / f"optimizer_rank{rank}.pt"
        try:
            state["optimizer"] = torch.load(f, weights_only=True)
        except Exception as e:  # noqa: BLE001 -- one named error, as above
            raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    return parts["adapter.safetensors"], state, [parts[c] for c in cursors]


@contextlib.contextmanager
def _cleaned_up_on_failure(tmp: Path) -> Iterator[None]:
    """A checkpoint write that fails (a full disk, a read-only folder) removes its partial folder and is one
    CheckpointError naming what could not be written."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = e.filename or tmp
        raise CheckpointError(f"{where}: cannot write the checkpoint ({e.strerror or e}); none of it was kept") from e
