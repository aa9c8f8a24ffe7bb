"""The one table of the demo's stages and the runner.

A stage has a name, what it runs, and the output (under the run folder) whose existence marks it done; a switch (a
DemoConfig bool) turns optional ones on. Training stages are the one training recipe (recipes/train.py) launched
with `accelerate launch` (N processes of our DDP engine, gloo) on a training config of their own,
recipes/configs/demo/STAGE.yaml, which says how the stage trains; the table adds only what the run decides: the run
folder, its shards, the files of earlier stages it reads (`inputs`), the tower, seed and precision, and the user's
overrides (`DemoConfig.stages`). Each stage prints its time, RUN/timings.json keeps them, a stage whose output
exists is skipped (`--force` redoes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mm_llama.config import load_config

from .config import ROOT, DemoConfig, device_ok_dtype, stage_config
from .data_stages import stage_corpora, stage_encoder, stage_speech_cache
from .dialogue import stage_dialogue_data
from .evaluation import stage_evaluate
from .report import stage_report


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoConfig, Path], dict]
    done: str  # the output whose existence marks the stage done
    switch: str = ""  # a DemoConfig bool that turns the stage on (empty: always on)
    training: bool = False  # a training run (redone from step 0 with --force: it would otherwise resume)


@dataclass(frozen=True)
class Training:
    """A training stage: recipes/configs/demo/NAME.yaml on RUN/shards/DATA (a shard folder, or {folder: weight} for
    several sources mixed), `inputs` {config key: a file of an earlier stage, relative to the run folder}."""

    name: str
    data: str | dict[str, float]
    inputs: dict = field(default_factory=dict)

    def __call__(self, cfg: DemoConfig, run: Path) -> dict:
        def index(folder: str) -> str:
            return str(run / "shards" / folder / "index.json")

        if isinstance(self.data, dict):
            sources = [{"train": index(k), "weight": w} for k, w in self.data.items()]
            args = ["data.train=", f"data.sources={json.dumps(sources)}"]
        else:
            args = [f"data.train={index(self.data)}"]
        args += [f"{key}={run / rel}" for key, rel in self.inputs.items()]
        return train(cfg, run, self.name, args)


def training(name: str, data, inputs: dict | None = None, switch: str = "", done: str = "adapter.safetensors"):
    return Stage(name, Training(name, data, inputs or {}), f"{name}/{done}", switch, training=True)


STAGE_TABLE = [
    Stage("corpora", stage_corpora, "shards/corpora.json"),
    Stage("encoder", stage_encoder, "encoder/classifier.json"),
    Stage("speech_cache", stage_speech_cache, "shards/speech_train_enc/index.json"),
    training("image", "image_train", {"model.image.vision_init": "encoder/encoder.safetensors"}),
    training("video", "video_train", {"model.video.image_adapter": "image/adapter.safetensors"}),
    # speech: CTC only on the cached encoder outputs (cheap: no tower), then the token loss from that adapter
    training("speech_ctc", "speech_train_enc"),
    training("speech", "speech_train_enc", {"init_adapter": "speech_ctc/adapter.safetensors"}),
    training("conformer_ctc", "speech_train_enc", switch="conformer"),
    training("conformer", "speech_train_enc", {"init_adapter": "conformer_ctc/adapter.safetensors"}, "conformer"),
    # the dialogue: the three adapters on one tower, the image and video parts trained on questions mixed with their
    # captions (the speech part frozen)
    Stage("dialogue_data", stage_dialogue_data, "shards/dialogue_test/dialogue_test.jsonl"),
    training(
        "dialogue",
        {"dialogue_train": 6, "image_train": 1, "video_train": 1},
        {
            "model.image.init": "image/adapter.safetensors",
            "model.video.init": "video/adapter.safetensors",
            "model.speech.init": "speech/adapter.safetensors",
        },
        done="adapter-video.safetensors",
    ),
    Stage("evaluate", stage_evaluate, "eval/summary.json"),
    Stage("report", stage_report, "report.md"),
]
STAGES = [s.name for s in STAGE_TABLE]
DONE = {s.name: s.done for s in STAGE_TABLE}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_streaming(cmd: list[str], env: dict, log: Path, keep: int = 40) -> tuple[int, list[str]]:
    """Run a training process: everything it prints goes to `log`; its progress lines (`[train] ...`, resume and
    skip notes) are shown as they come, so a long stage is visibly alive. -> (exit status, its last lines)."""
    tail: deque[str] = deque(maxlen=keep)
    popen = dict(env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    with log.open("w") as f, subprocess.Popen(cmd, **popen) as proc:
        for line in proc.stdout:
            f.write(line)
            tail.append(line)
            if line.startswith(("[train]", "resume:", "step ")):
                print("    " + line.rstrip(), flush=True)
    return proc.returncode, list(tail)


def train(cfg: DemoConfig, run: Path, name: str, args: list[str]) -> dict:
    """The training recipe on the stage's config, `accelerate launch`ed over `nproc` processes."""
    args = [
        f"run_dir={run / name}",
        f"dtype={device_ok_dtype(cfg, run)}",
        f"tower.path={cfg.tower}",
        f"seed={cfg.seed}",
        *args,
        *cfg.stages.get(name, []),
    ]
    script = ["-m", "recipes.train", "--config", str(stage_config(name)), *args]
    if cfg.nproc > 1:
        launch = [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(cfg.nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
        cmd = [sys.executable, *launch, *script]
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cfg.nproc)), PYTHONUNBUFFERED="1")
    print("  $ " + " ".join(["python", *script]), flush=True)
    (run / name).mkdir(parents=True, exist_ok=True)
    rc, tail = _run_streaming(cmd, env, run / name / "train.log")
    if rc != 0:
        log = run / name / "train.log"
        raise RuntimeError(f"training stage {name} failed (rc {rc}); log: {log}; its last lines:\n" + "".join(tail))
    losses = json.loads((run / name / "losses.json").read_text())
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"  {name}: loss {first:.3f} -> {last:.3f} over {len(losses)} steps", flush=True)
    return {"steps": len(losses), "loss_first": first, "loss_last": last}


def run_demo(cfg: DemoConfig, stages: list[str], force: bool = False, table: list[Stage] = STAGE_TABLE) -> dict:
    """Run `stages` of `table` in the table's order (skipping finished ones unless `force`); -> the run's timings."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    trained = [s.name for s in table if s.training]
    unknown = sorted(set(cfg.stages) - set(trained))
    if unknown:
        raise ValueError(f"stages: {unknown} are not training stages ({trained})")
    tfile = run / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {}
    t_all = time.perf_counter()
    for stage in table:
        s = stage.name
        if s not in stages:
            continue
        if stage.switch and not getattr(cfg, stage.switch):
            print(f"[{s}] off ({stage.switch}=false; {stage.switch}=true runs it): skipped", flush=True)
            continue
        if (run / stage.done).exists() and not force:
            print(f"[{s}] outputs exist ({run / stage.done}): skipped", flush=True)
            continue
        if force and stage.training and (run / s).exists():
            shutil.rmtree(run / s)  # redo from step 0: a training run would otherwise resume from its checkpoints
        print(f"[{s}] ...", flush=True)
        t0 = time.perf_counter()
        result = stage.run(cfg, run)
        timings[s] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"[{s}] done in {timings[s]['seconds']:.1f} s", flush=True)
    per_stage = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in timings.items())
    print(f"demo: {time.perf_counter() - t_all:.1f} s this run; per stage: {per_stage}", flush=True)
    return timings


def main(
    argv=None,
    *,
    prog: str = "python -m recipes.demo",
    doc: str | None = None,
    table: list[Stage] = STAGE_TABLE,
    config: str | None = None,
) -> int:
    """The command line of a stage table: `--config` (default `config`: a YAML of DemoConfig values, else the
    dataclass defaults), `--stages`, `--force`, key=value overrides."""
    doc = doc or sys.modules[__package__].__doc__  # the package's docstring is its help
    names = [s.name for s in table]
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = config or "the full demo"
    ap.add_argument("--config", default=config, help=f"YAML of DemoConfig values (default: {what})")
    ap.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even when their outputs exist")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. seed=1 or stages.image=[steps=200]")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(DemoConfig, a.config, a.overrides)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in names]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {names}")
    run_demo(cfg, stages, a.force, table)
    return 0
