"""The training recipe's data: raw shard samples -> items (conversations rendered per source), collated (packed
when `data.pack`), streamed by a resumable loader over one source or several mixed sample by sample."""

from __future__ import annotations

from mm_llama.adapters.generation import Collate
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.registry import MODALITIES
from mm_llama.adapters.samples import SampleOptions, Samples
from mm_llama.config import ConfigError
from mm_llama.data.loader import StreamingLoader

from .train_config import run_kinds


def model_kinds(cfg) -> list[str]:
    """Every part the run's model holds: its modalities and the parts they require, in registry order."""
    kinds = run_kinds(cfg)
    needed = set(kinds) | {r for k in kinds for r in MODALITIES[k].requires}
    return [k for k in MODALITIES if k in needed]


def collate_for(cfg) -> Collate:
    return Collate(model_kinds(cfg), pack_tokens=cfg.data.max_tokens if cfg.data.pack else 0)


def samples_for(cfg, tok, model):
    """Raw shard samples -> training items: conversations with any of the model's media, plain samples of a trained
    modality's medium, rendered as `data.template` and labelled as `data.train_on` say (per source, when a source
    gives its own)."""
    d = cfg.data

    def one(template=None, train_on=None, prompt=None) -> Samples:
        opts = SampleOptions(template or d.template, train_on or d.train_on, d.max_text_tokens, d.max_tokens)
        answer = AnswerOptions(prompt=d.prompt if prompt is None else prompt)
        return Samples.of(model, tok, options=opts, answer=answer, cfg=cfg.model, plain_kinds=run_kinds(cfg))

    if not d.sources:
        return one()
    return SourceSamples([one(s.template, s.train_on, s.prompt) for s in d.sources])


class SourceSamples:
    """The sample maker of a mixed run: each raw sample made by its source's maker (`__src__`); picklable."""

    def __init__(self, makers: list[Samples]):
        self.makers = makers

    def __call__(self, raw: dict) -> dict:
        return self.makers[raw.get("__src__", 0)](raw)

    def rendered(self, raw: dict):
        return self.makers[raw.get("__src__", 0)].rendered(raw)


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
    if d.sources:  # mixed sample by sample, in proportion to the weights (deterministic, resumable)
        args.update(weights=[s.weight for s in d.sources])
        return StreamingLoader([s.train for s in d.sources], **{**args, **kw})
    if not d.train:
        raise ConfigError("data.train: no shards given (or give data.sources)")
    return StreamingLoader(d.train, **{**args, **kw})
