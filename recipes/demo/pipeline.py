"""The one stage table (name, function, the output that marks it done) and the runner: each stage prints its
time, writes RUN/timings.json and is skipped when its output exists (`--force` redoes it)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mm_llama.config import load_config

from .config import DemoConfig
from .data_stages import stage_corpora, stage_encoder, stage_speech_cache
from .evaluation import stage_evaluate
from .report import stage_report
from .training import TRAINING, TrainingStage


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoConfig, Path], dict]
    done: str  # the output (under the run folder) whose existence marks the stage done
    switch: str = ""  # a DemoConfig bool that turns the stage on (empty: always on)


STAGE_TABLE = [
    Stage("corpora", stage_corpora, "shards/corpora.json"),
    Stage("encoder", stage_encoder, "encoder/classifier.json"),
    Stage("speech_cache", stage_speech_cache, "shards/speech_train_enc/index.json"),
    *(Stage(t.name, t, f"{t.name}/adapter.safetensors", t.switch) for t in TRAINING),
    Stage("evaluate", stage_evaluate, "eval/summary.json"),
    Stage("report", stage_report, "report.md"),
]
STAGES = [s.name for s in STAGE_TABLE]
DONE = {s.name: s.done for s in STAGE_TABLE}


def run_demo(cfg: DemoConfig, stages: list[str], force: bool = False) -> dict:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tfile = run / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {}
    t_all = time.perf_counter()
    for stage in STAGE_TABLE:
        if stage.name not in stages:
            continue
        s = stage.name
        if stage.switch and not getattr(cfg, stage.switch):
            print(f"[{s}] off ({stage.switch}=false; {stage.switch}=true runs it): skipped", flush=True)
            continue
        if (run / stage.done).exists() and not force:
            print(f"[{s}] outputs exist ({run / stage.done}): skipped", flush=True)
            continue
        if force and isinstance(stage.run, TrainingStage) and (run / s).exists():
            shutil.rmtree(run / s)  # redo from step 0: a training run would otherwise resume from its checkpoints
        print(f"[{s}] ...", flush=True)
        t0 = time.perf_counter()
        result = stage.run(cfg, run)
        timings[s] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"[{s}] done in {timings[s]['seconds']:.1f} s", flush=True)
    print(f"demo: {time.perf_counter() - t_all:.1f} s this run; per stage: "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in timings.items()), flush=True)  # fmt: skip
    return timings


def main(argv=None) -> int:
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m recipes.demo", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default=None, help="YAML of DemoConfig values (defaults: the full demo)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even when their outputs exist")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. speech_steps=200")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(DemoConfig, a.config, a.overrides)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    run_demo(cfg, stages, a.force)
    return 0
