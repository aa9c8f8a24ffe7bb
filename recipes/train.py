"""ONE training recipe for every modality (a plug-in each, adapters/modalities/) on a frozen Llama 3 tower.

    python -m recipes.train --config recipes/configs/debug_image.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m recipes.train --config ... engine=ours
    accelerate launch --multi_gpu --num_processes 2 -m recipes.train --config ...

The recipe reads the config, says how to build the model (the tower + the configured modality's part, on the
frozen parts it requires) and its data, and hands both to the trainer (mm_llama/engine/trainer.py), which places
the model, runs the step loop, checkpoints, logs metrics.jsonl and saves RUN/adapter.safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import init_part_from_file, load_part, save_part
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.hf_mllama import is_mllama_folder, load_hf_mllama
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.registry import MODALITIES, get_modality
from mm_llama.adapters.samples import SampleOptions, Samples
from mm_llama.assets import resolve
from mm_llama.config import ConfigError, bounded, choice, load_config
from mm_llama.data.conversation import TEMPLATES, TRAIN_ON
from mm_llama.data.loader import StreamingLoader
from mm_llama.engine import exit_process
from mm_llama.engine.trainer import Callback, Trainer, TrainerConfig
from mm_llama.llama import Tokenizer, Transformer, get_preset, load_pretrained
from mm_llama.llama.checkpoint import CheckpointError


@dataclass
class TowerCfg:
    path: str | None = None  # Meta dir | HF dir (an Mllama one: its text model) | .gguf; None: a random preset
    preset: str = "debug"
    vocab_size: int | None = None  # random preset: match the tokenizer's vocabulary
    seed: int = 0


@dataclass
class DataCfg:
    train: str = ""
    batch_size: int = bounded(2, 1)
    num_workers: int = bounded(0, 0)
    shuffle_buffer: int = bounded(16, 1)
    max_bad_fraction: float = bounded(0.01, 0.0, 1.0)
    prompt: str = ""
    max_text_tokens: int = bounded(64, 1)
    # shards | interleave (N ranks x B/N == 1 rank x B, for checks) | none (the same stream on every rank)
    split: str = choice("shards", "shards", "interleave", "none")
    # how samples are rendered (data/conversation.py): auto = the tokenizer's chat format for conversations, the
    # plain caption layout for caption/transcript samples; plain | llama3 | chatml force one
    template: str = choice("auto", *TEMPLATES)
    train_on: str = choice("assistant", *TRAIN_ON)  # loss on: every assistant turn | the last one | all tokens


def config_class() -> type:
    """The training config for the registered modalities: the trainer's keys, the tower, `model` (the modality to
    train, the tokenizer, and one section per plug-in: its `Config`), the data. A plug-in registered later (a test's
    toy modality) is in the class this returns from then on."""
    names = list(MODALITIES)
    model = [("modality", str, choice(names[0], *names)), ("tokenizer", str, "")]
    model += [(n, s.part.Config, field(default_factory=s.part.Config)) for n, s in MODALITIES.items()]
    fields = [
        ("init_adapter", str, ""),  # start the part's weights from this adapter file (same modality and options)
        # lm: the token loss through the frozen tower (+ the plug-in's auxiliary losses); aux: the auxiliary losses
        # only, the tower skipped (e.g. a cheap CTC phase for the speech adapter before the LM phase)
        ("objective", str, choice("lm", "lm", "aux")),
        ("tower", TowerCfg, field(default_factory=TowerCfg)),
        ("model", make_dataclass("ModelCfg", model), field(default_factory=make_dataclass("ModelCfg", model))),
        ("data", DataCfg, field(default_factory=DataCfg)),
    ]
    return make_dataclass("TrainConfig", fields, bases=(TrainerConfig,))


TrainConfig = config_class()


def load_train_config(path=None, overrides=None):
    return load_config(config_class(), path, overrides)


def build_tower(cfg) -> Transformer:
    if cfg.tower.path:
        path = resolve(cfg.tower.path)
        if is_mllama_folder(path):  # Llama 3.2 Vision: its text model (model.image.release: its image part)
            return load_hf_mllama(Path(path), text_only=True)
        return load_pretrained(path)
    args = get_preset(cfg.tower.preset)
    if cfg.tower.vocab_size:
        args = args.replace(vocab_size=cfg.tower.vocab_size)
    tower = Transformer(args)
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(cfg.tower.seed))
    return tower.requires_grad_(False).eval()


def build_model(cfg, tower: Transformer) -> ComposedModel:
    """The tower + a fresh part of the configured modality, built by its plug-in on the frozen parts it requires
    (each a module or an adapter file); `init_adapter` and `objective` applied."""
    spec = get_modality(cfg.model.modality)
    parts = {}
    for kind, base in spec.part.base_parts(tower, cfg.model).items():
        part = load_part(tower, base, parts)[1] if isinstance(base, (str, Path)) else base
        parts[kind] = part.requires_grad_(False)
    parts[spec.name] = spec.part.build(tower, cfg.model, parts)
    model = ComposedModel(tower, parts)
    if cfg.init_adapter:
        try:
            init_part_from_file(model, spec.name, resolve(cfg.init_adapter))
        except (CheckpointError, FileNotFoundError) as e:
            msg = f"init_adapter: {e} (use a file from a run with the same model.{spec.name} options)"
            raise ConfigError(msg) from None
    model.aux_only = cfg.objective == "aux"
    return model


def model_for(cfg, dtype: torch.dtype) -> ComposedModel:
    """The config's model with its tower's weights in `dtype` (the parts stay fp32)."""
    return build_model(cfg, build_tower(cfg).to(dtype=dtype))


def collate_for(cfg) -> Collate:
    spec = get_modality(cfg.model.modality)
    return Collate([*spec.requires, spec.name])


def samples_for(cfg, tok, model) -> Samples:
    """Raw shard samples -> training items: conversations with any of the model's media, plain samples of the
    trained modality's medium, rendered as `data.template` and labelled as `data.train_on` says."""
    d = cfg.data
    opts = SampleOptions(template=d.template, train_on=d.train_on, max_text_tokens=d.max_text_tokens)
    answer = AnswerOptions(prompt=d.prompt)
    return Samples.of(model, tok, options=opts, answer=answer, cfg=cfg.model, plain_kinds=[cfg.model.modality])


def loader_for(cfg, tok, model, info, **kw) -> StreamingLoader:
    """This rank's resumable stream of batches (the plug-in's sample maker, collated)."""
    d = cfg.data
    args = dict(
        batch_size=d.batch_size,
        batches_per_epoch=10**9,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        max_bad_fraction=d.max_bad_fraction,
        split=d.split,
    )
    args.update(map_fn=samples_for(cfg, tok, model), collate_fn=collate_for(cfg))
    return StreamingLoader(d.train, **{**args, **kw})


def trainer_for(cfg, callbacks=(), **loader_kw) -> Trainer:
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    return Trainer(
        cfg,
        build_model=lambda dtype: model_for(cfg, dtype),
        make_loader=lambda model, info: loader_for(cfg, tok, model, info, **loader_kw),
        save_model=lambda model, path: save_part(model, cfg.model.modality, path),
        config=cfg,
        callbacks=callbacks,
    )


def main(argv=None, callbacks: list[Callback] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file (values only; defaults live in the config classes)")
    ap.add_argument("--profile", action="store_true", help="torch profiler trace of a few steps into RUN/profile/")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 engine=torch")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides + (["profile=true"] if args.profile else []))
        trainer = trainer_for(cfg, callbacks or [])
        losses = trainer.run()
    except (ConfigError, CheckpointError) as e:
        kind = "config" if isinstance(e, ConfigError) else "checkpoint"
        print(f"train.py: {kind} error: {e}", file=sys.stderr)
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
