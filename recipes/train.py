"""ONE training recipe for every modality (a plug-in each, adapters/modalities/) on a frozen Llama 3 tower.

    python -m recipes.train --config recipes/configs/debug_image.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m recipes.train --config ... engine=ours
    accelerate launch --multi_gpu --num_processes 2 -m recipes.train --config ...

The recipe reads the config (recipes/train_config.py), says how to build the model (the tower + the configured
modality's part, or several parts with `model.modalities`, on the frozen parts they require) and its data
(recipes/train_data.py: one source or several mixed), and hands both to the trainer (mm_llama/engine/trainer.py),
which places the model, runs the step loop, checkpoints, logs metrics.jsonl and saves RUN/adapter.safetensors
(several parts: RUN/adapter-KIND.safetensors each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import init_part_from_file, load_part, save_part
from mm_llama.adapters.hf_mllama import is_mllama_folder, load_hf_mllama
from mm_llama.adapters.modality import PartHooks
from mm_llama.adapters.registry import MODALITIES
from mm_llama.assets import resolve
from mm_llama.config import ConfigError
from mm_llama.engine import exit_process
from mm_llama.engine.dist import launched_distributed
from mm_llama.engine.trainer import Callback, Trainer
from mm_llama.llama import Tokenizer, Transformer, load_pretrained, random_tower, random_tower_source
from mm_llama.llama.checkpoint import CheckpointError
from mm_llama.llama.slices import TowerRows, fill_sharded, tower_skeleton

# absolute (the installed package): this file also runs as a script (`torchrun recipes/train.py`)
from mm_llama.recipes.train_config import (
    DataCfg,
    SourceCfg,
    TowerCfg,
    TrainConfig,
    config_class,
    load_train_config,
    run_kinds,
)
from mm_llama.recipes.train_data import SourceSamples, collate_for, loader_for, model_kinds, samples_for
from mm_llama.recipes.train_eval import InLoopEval

__all__ = [  # the recipe's pieces, importable from here (tests, other recipes)
    "DataCfg",
    "SourceCfg",
    "SourceSamples",
    "TowerCfg",
    "TrainConfig",
    "build_model",
    "build_tower",
    "collate_for",
    "config_class",
    "load_train_config",
    "loader_for",
    "main",
    "model_for",
    "model_kinds",
    "run_kinds",
    "samples_for",
    "save_trained",
    "tower_source",
    "trainer_for",
]


def sharded_rows(cfg) -> TowerRows | None:
    """The tower's files read row by row, when each rank should read only the rows it keeps: `parallel.tower=fsdp`
    on several processes with a Hugging Face or Meta checkpoint (a GGUF or Llama 3.2 Vision folder loads whole)."""
    if cfg.parallel.tower != "fsdp" or not cfg.tower.path or not launched_distributed():
        return None
    path = resolve(cfg.tower.path)
    if is_mllama_folder(path):
        return None
    try:
        return TowerRows(path)
    except NotImplementedError:
        return None


def build_tower(cfg, dtype: torch.dtype = torch.float32) -> Transformer:
    """The config's tower, its weights read straight into `dtype` (a bf16 tower never exists in fp32 first)."""
    if cfg.tower.path:
        path = resolve(cfg.tower.path)
        if is_mllama_folder(path):  # Llama 3.2 Vision: its text model (model.image.release: its image part)
            return load_hf_mllama(Path(path), dtype=dtype, text_only=True)
        return load_pretrained(path, dtype=dtype)
    return random_tower(cfg.tower.preset, cfg.tower.vocab_size, cfg.tower.seed).to(dtype)


def tower_source(cfg) -> str:
    """Where the run's tower comes from, as adapter files record it (`mm-llama ask` finds the tower from it)."""
    if cfg.tower.path:
        path = cfg.tower.path
        return path if path.startswith("asset:") or not Path(path).exists() else str(Path(path).resolve())
    return random_tower_source(cfg.tower.preset, cfg.tower.vocab_size, cfg.tower.seed)


def build_model(cfg, tower: Transformer) -> ComposedModel:
    """The tower + a fresh part of each configured modality (built by its plug-in on the frozen parts it requires,
    each a module or an adapter file, unless the run builds those too); `init`/`init_adapter`, `trainable` and
    `objective` applied."""
    kinds = run_kinds(cfg)
    if cfg.init_adapter and len(kinds) > 1:
        raise ConfigError("init_adapter is for one-modality runs; give model.<modality>.init for each part")
    parts = {}
    for kind in kinds:
        spec = MODALITIES[kind]
        if not all(r in parts for r in spec.requires):
            for need, base in spec.part.base_parts(tower, cfg.model).items():
                part = load_part(tower, base, parts)[1] if isinstance(base, (str, Path)) else base
                parts[need] = part.requires_grad_(False)
        parts[kind] = spec.part.build(tower, cfg.model, parts)
    model = ComposedModel(tower, parts)
    for kind in kinds:
        section = getattr(cfg.model, kind)
        init, key = (cfg.init_adapter, "init_adapter") if cfg.init_adapter else (section.init, f"model.{kind}.init")
        if init:
            try:
                init_part_from_file(model, kind, resolve(init))
            except (CheckpointError, FileNotFoundError) as e:
                raise ConfigError(f"{key}: {e} (use a file from a run with the same model.{kind} options)") from None
        if not section.trainable:
            model.part(kind).requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"nothing to train: every part of {kinds} has trainable: false")
    no_aux = {f.name: f.default for f in dataclasses.fields(PartHooks)}["aux_loss"]
    if cfg.objective == "aux" and all(MODALITIES[k].part.aux_loss is no_aux for k in kinds):
        raise ConfigError(f"objective=aux: no part of {kinds} has an auxiliary loss (train with objective=lm)")
    model.aux_only = cfg.objective == "aux"
    model.partial_batches = len(kinds) > 1 or len(cfg.data.sources) > 1  # a batch may leave a part without media
    return model


def model_for(cfg, dtype: torch.dtype, rows: TowerRows | None = None) -> ComposedModel:
    """The config's model with its tower's weights in `dtype` (the parts stay fp32); with `rows`, the tower is a
    skeleton (embeddings only) that `fill_sharded` fills once it is sharded."""
    tower = tower_skeleton(rows, dtype) if rows is not None else build_tower(cfg, dtype)
    return build_model(cfg, tower)


def trainer_for(cfg, callbacks=(), **loader_kw) -> Trainer:
    run_kinds(cfg)  # a bad modality list is a config error before the run folder is looked at
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    rows = sharded_rows(cfg)
    return Trainer(
        cfg,
        build_model=lambda dtype: model_for(cfg, dtype, rows),
        after_place=(lambda model: _fill(model, rows)) if rows is not None else None,
        make_loader=lambda model, info: loader_for(cfg, tok, model, info, **loader_kw),
        save_model=lambda model, path: save_trained(cfg, model, path),
        config=cfg,
        callbacks=callbacks,
        make_eval=lambda info: InLoopEval(cfg, tok, info),
    )


def _fill(model, rows: TowerRows) -> None:
    read = fill_sharded(model.tower, rows)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"parallel.tower=fsdp: tower read shard by shard, {read / 1e6:.1f} MB on this rank", file=sys.stderr)


def save_trained(cfg, model, path: Path) -> None:
    """RUN/adapter.safetensors (one modality), or RUN/adapter-KIND.safetensors for each trainable part (several);
    each file records the tower and tokenizer it was trained with."""
    sources = {"tower": tower_source(cfg), "tokenizer": cfg.model.tokenizer}
    kinds = run_kinds(cfg)
    if len(kinds) == 1:
        save_part(model, kinds[0], path, sources=sources)
        return
    for kind in kinds:  # adapter-KIND.safetensors (the best so far: adapter.best-KIND.safetensors)
        if getattr(cfg.model, kind).trainable:
            save_part(model, kind, path.with_name(f"{path.stem}-{kind}{path.suffix}"), sources=sources)


def main(argv=None, callbacks: list[Callback] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file or a shipped config's name (mm-llama configs)")
    ap.add_argument("--profile", action="store_true", help="torch profiler trace of a few steps into RUN/profile/")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 engine=torch")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides + (["profile=true"] if args.profile else []))
        trainer = trainer_for(cfg, callbacks or [])
        losses = trainer.run()
    except (ConfigError, CheckpointError) as e:
        kind = "config" if isinstance(e, ConfigError) else "checkpoint"
        print(f"{prog or 'train.py'}: {kind} error: {e}", file=sys.stderr)
        _exit_distributed(2)
        return 2
    if trainer.info.is_main:
        print("LOSSES " + json.dumps(losses), flush=True)
    _exit_distributed(0)
    return 0


def _exit_distributed(code: int) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
