"""The training stages: rows of one table, each an `accelerate launch` (N processes of our DDP engine) of the one
training recipe (recipes/train.py) with the stage's config, steps, batch and shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ROOT, DemoConfig, device_ok_dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_streaming(cmd: list[str], env: dict, log: Path, keep: int = 40) -> tuple[int, list[str]]:
    """Run a training process: everything it prints goes to `log`; its progress lines (`[train] ...`, resume and
    skip notes) are shown as they come, so a long stage is visibly alive. -> (exit status, its last lines)."""
    from collections import deque

    tail: deque[str] = deque(maxlen=keep)
    with log.open("w") as f, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, bufsize=1) as proc:  # fmt: skip
        for line in proc.stdout:
            f.write(line)
            tail.append(line)
            if line.startswith(("[train]", "resume:", "step ")):
                print("    " + line.rstrip(), flush=True)
    return proc.returncode, list(tail)


def _train(cfg: DemoConfig, run: Path, name: str, config: str, args: list[str]) -> dict:
    """accelerate launch (N processes, our DDP engine) of the one training recipe."""
    args = [f"run_dir={run / name}", f"dtype={device_ok_dtype(cfg, run)}", f"tower.path={cfg.tower}",
            f"seed={cfg.seed}", *args, *cfg.extra_train_args.get(name, [])]  # fmt: skip
    script = [str(ROOT / "recipes/train.py"), "--config", str(ROOT / "recipes/configs" / config), *args]
    if cfg.nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(cfg.nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *script]  # fmt: skip
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cfg.nproc)), PYTHONUNBUFFERED="1")
    print("  $ " + " ".join(cmd[cmd.index(script[0]) :]), flush=True)
    (run / name).mkdir(parents=True, exist_ok=True)
    rc, tail = _run_streaming(cmd, env, run / name / "train.log")
    if rc != 0:
        raise RuntimeError(f"training stage {name} failed (rc {rc}); log: {run / name / 'train.log'}; its last "
                           "lines:\n" + "".join(tail))  # fmt: skip
    losses = json.loads((run / name / "losses.json").read_text())
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"  {name}: loss {first:.3f} -> {last:.3f} over {len(losses)} steps", flush=True)
    return {"steps": len(losses), "loss_first": first, "loss_last": last}


@dataclass(frozen=True)
class TrainingStage:
    """One training stage: its recipe config, the DemoConfig fields holding its steps and batch, its training shards,
    and extra overrides (`{run}` is the run folder)."""

    name: str
    config: str
    steps: str
    batch: str
    shards: str
    extra: tuple[str, ...] = ()
    switch: str = ""  # a DemoConfig bool that turns the stage on (empty: always on)

    def __call__(self, cfg: DemoConfig, run: Path) -> dict:
        args = [f"steps={getattr(cfg, self.steps)}", f"data.batch_size={getattr(cfg, self.batch)}",
                f"data.train={run / 'shards' / self.shards / 'index.json'}",
                *(x.format(run=run, encoder=cfg.speech_encoder) for x in self.extra)]  # fmt: skip
        return _train(cfg, run, self.name, self.config, args)


_CTC_PHASE = ("optim.lr=3.0e-3", "optim.warmup_steps=50")  # a small adapter on a cheap loss: a high rate
_LM_PHASE = ("optim.lr=1.0e-3", "optim.warmup_steps=5")
_CONFORMER = ("model.speech.encoder=conformer:small", "model.speech.adapter=small_160ms",
              "model.speech.freeze_encoder=false")  # fmt: skip

TRAINING = [
    TrainingStage("image", "demo_image_smollm2.yaml", "image_steps", "image_batch", "image_train",
                  ("model.image.vision_init={run}/encoder/encoder.safetensors",)),
    TrainingStage("video", "demo_video_smollm2.yaml", "video_steps", "video_batch", "video_train",
                  ("model.video.image_adapter={run}/image/adapter.safetensors",)),
    # speech: CTC only on the cached encoder outputs (cheap: no tower), then the token loss from that adapter
    TrainingStage("speech_ctc", "demo_speech_smollm2.yaml", "speech_ctc_steps", "speech_batch", "speech_train_enc",
                  ("model.speech.encoder={encoder}", "objective=aux", *_CTC_PHASE)),
    TrainingStage("speech", "demo_speech_smollm2.yaml", "speech_steps", "speech_batch", "speech_train_enc",
                  ("model.speech.encoder={encoder}", "init_adapter={run}/speech_ctc/adapter.safetensors",
                   *_LM_PHASE)),
    TrainingStage("conformer_ctc", "demo_speech_smollm2.yaml", "conformer_ctc_steps", "speech_batch",
                  "speech_train_enc", (*_CONFORMER, "objective=aux", *_CTC_PHASE), switch="conformer"),
    TrainingStage("conformer", "demo_speech_smollm2.yaml", "conformer_steps", "speech_batch", "speech_train_enc",
                  (*_CONFORMER, "init_adapter={run}/conformer_ctc/adapter.safetensors", *_LM_PHASE),
                  switch="conformer"),
]  # fmt: skip
