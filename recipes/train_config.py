"""The training recipe's config: the trainer's keys (mm_llama/engine/trainer.py), the tower, `model` (the
modality or modalities to train, the tokenizer, one section per plug-in) and the data (one source or several).
Configs are typed: unknown keys and bad values are errors naming the key before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from mm_llama.adapters.registry import MODALITIES
from mm_llama.config import ConfigError, bounded, choice, load_config
from mm_llama.data.conversation import TEMPLATES, TRAIN_ON
from mm_llama.engine.trainer import TrainerConfig

from .catalog import find_config


@dataclass
class TowerCfg:
    path: str | None = None  # Meta dir | HF dir (an Mllama one: its text model) | .gguf; None: a random preset
    preset: str = "debug"
    vocab_size: int | None = None  # random preset: match the tokenizer's vocabulary
    seed: int = 0


@dataclass
class SourceCfg:
    """One source of a mixed run: its shards, its share of the samples, and (optionally) its own rendering."""

    train: str = ""
    weight: float = bounded(1.0, 0.0)
    template: str | None = None  # None: data.template
    train_on: str | None = None  # None: data.train_on
    prompt: str | None = None  # None: data.prompt

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.sources: every source needs `train` (its shards)")
        if self.weight <= 0:
            raise ConfigError(f"data.sources: {self.train}: weight must be > 0, got {self.weight}")
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"data.sources: {self.train}: template {self.template!r}: use one of {TEMPLATES}")
        if self.train_on is not None and self.train_on not in TRAIN_ON:
            raise ConfigError(f"data.sources: {self.train}: train_on {self.train_on!r}: use one of {TRAIN_ON}")


@dataclass
class DataCfg:
    train: str = ""
    # several sources mixed sample by sample (instead of `train`): [{train, weight, template?, train_on?, prompt?}]
    sources: list[SourceCfg] = field(default_factory=list)
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
    max_tokens: int = bounded(0, 0)  # > 0: a longer sample is a counted skip naming it; the packed rows' length
    pack: bool = False  # pack each batch's samples into rows of at most max_tokens (block-diagonal attention)

    def __post_init__(self):
        if self.sources and self.train:
            raise ConfigError("give data.train (one source) or data.sources (several), not both")
        if self.pack and not self.max_tokens:
            raise ConfigError("data.pack: true needs data.max_tokens (the length of a packed row)")
        if self.max_tokens and self.max_tokens < self.max_text_tokens:
            msg = f"data.max_tokens {self.max_tokens} is below data.max_text_tokens {self.max_text_tokens}"
            raise ConfigError(f"{msg}: no sample with a full-length text would fit; raise it or lower max_text_tokens")


PART_FIELDS = [
    ("trainable", bool, True),  # false: the part is built (or loaded from `init`) and stays frozen
    ("init", str | None, None),  # start the part from this adapter file (mixed runs; one modality: init_adapter)
]


def config_class() -> type:
    """The training config for the registered modalities: the trainer's keys, the tower, `model` (the modality to
    train, the tokenizer, and one section per plug-in: its `Config`), the data. A plug-in registered later (a test's
    toy modality) is in the class this returns from then on."""
    names = list(MODALITIES)
    model = [("modality", str, choice(names[0], *names)), ("tokenizer", str, "")]
    # several parts in one run (instead of `modality`); each plug-in's section gains `trainable` and `init`
    model += [("modalities", list[str], field(default_factory=list))]
    for n, s in MODALITIES.items():
        section = make_dataclass(f"{n.title()}Section", PART_FIELDS, bases=(s.part.Config,))
        model.append((n, section, field(default_factory=section)))
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
    """The training config from a YAML file or a shipped config's name (`debug_image`, `demo/speech`; see
    `mm-llama configs`), with key=value overrides."""
    return load_config(config_class(), find_config(path) if path is not None else None, overrides)


def run_kinds(cfg) -> list[str]:
    """The modalities whose parts this run builds: `model.modalities`, else `model.modality`, in registry order."""
    kinds = cfg.model.modalities or [cfg.model.modality]
    unknown = [k for k in kinds if k not in MODALITIES]
    if unknown or len(set(kinds)) != len(kinds):
        what = f"unknown {unknown}" if unknown else "a modality named twice"
        raise ConfigError(f"model.modalities {kinds}: {what} (known: {', '.join(MODALITIES)})")
    return [k for k in MODALITIES if k in kinds]
