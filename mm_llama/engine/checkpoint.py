"""Training checkpoints: trainable weights (safetensors) + optimizer + scheduler + RNG + step + data cursors.

Layout: RUN/checkpoints/step_00000010/{adapter.safetensors, train_state.pt, data_rank{r}.json}. A checkpoint is
written into a temporary folder and renamed into place once complete, so a crash mid-save leaves the previous
checkpoint loadable; only the last `keep` are kept. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from mm_llama.rng import py_rng_state_from_list, py_rng_state_to_list

_STEP_DIR = re.compile(r"step_(\d{8})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.search(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.search(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(run_dir) if (d / "train_state.pt").is_file()]
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": py_rng_state_to_list(random.getstate())}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(py_rng_state_from_list(st["python"]))


def save_checkpoint(
    run_dir, step: int, *, weights: dict, optimizer, scheduler, extra: dict, data_states: dict, rank: int,
    is_main: bool, keep: int = 3, barrier=None,
) -> Path:  # fmt: skip
    """All ranks call this; rank-local data cursors go in data_rank{r}.json, the rest is written by rank 0."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    (tmp / f"data_rank{rank}.json").write_text(json.dumps(data_states))
    if barrier:
        barrier()
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), **extra}  # fmt: skip
        torch.save(state, tmp / "train_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def load_checkpoint(path: str | Path, rank: int) -> tuple[dict, dict, dict]:
    """(weights, train_state, this rank's data cursor)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "adapter.safetensors"))
    state = torch.load(path / "train_state.pt", weights_only=True)
    data_file = path / f"data_rank{rank}.json"
    if not data_file.is_file():
        raise FileNotFoundError(f"{path}: no data cursor for rank {rank} (was it saved with another world size?)")
    return weights, state, json.loads(data_file.read_text())
