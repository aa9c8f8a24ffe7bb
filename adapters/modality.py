"""What a modality plug-in declares: one `Modality` per module under adapters/modalities/, registered in
adapters/registry.py. The composed model, the trainer, evaluation, the demo, the CLI and the web page call these
callables and never name a modality.

A `Modality` is a few small groups of independent callables, one group per concern (torchtitan's TrainSpec shape):

  part        the model: build a fresh part, rebuild one from an adapter file's metadata, which token rows it
              reads, and how it enters the composed forward (`prepare` a state from its batch inputs, then
              `input_rows` changes the input embeddings and/or `blocks` adds blocks before tower layers)
  data        the medium it reads (a data-layer `Medium`: extensions, decoder; the shard reader/writer know it
              from there), what one medium part of a conversation becomes (ids + payload, a picklable maker), the
              user turn of a plain caption/transcript sample, and `collate` (adapters/samples.py lays samples out)
  inference   a decoded medium -> one or more generation requests (prompt ids + inputs, the same layout the
              sample maker trains on), decoding rules (`stop_ids`, `finish`), how piece answers join
  evaluation  corpus metrics of hypotheses against references
  scale       the large repeated blocks (one FSDP2 unit each) and the memory plan's pieces

Token ids: a modality needs `rows` ids after the tower's vocabulary V; the registry gives each its own range, in
registration order (image V..V+7, video V+8, speech V+9), and `part.row_table` names the embedding table (and its
first row) those ids read. Adapter files record the range; a file whose range differs does not load.

Forward hooks receive the composed model (`model.part(kind)`, `model.token_id(kind)`, `model.tower`); a sample
without this modality's media must come out exactly as the bare tower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch
from torch import nn

from mm_llama.data.badsamples import SampleError
from mm_llama.data.conversation import Part
from mm_llama.data.media import Medium
from mm_llama.llama.model import Transformer
from mm_llama.llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from .composed import ComposedModel
    from .plan import PlanPieces

P = TypeVar("P", bound=nn.Module)  # a plug-in's part
S = TypeVar("S")  # a plug-in's forward state (what `prepare` makes of its batch inputs)
Block = Callable[[torch.Tensor], torch.Tensor]  # h -> h, run before a tower layer


@dataclass
class AnswerOptions:
    """Options of one answer (CLI, web page, evaluation)."""

    prompt: str = ""
    frames: int = 8
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    language: str = "English"
    on_token: Callable[[int, int], None] | None = None  # (sequence index, token id) as each is decoded


class MediaMaker(Protocol):
    """What `DataHooks.media` returns: turns a medium into what a sample holds (picklable: DataLoader workers get
    it). `decode(data, name, ext)`: a file's bytes -> the decoded medium; `plain(raw, ext)`: the medium of a plain
    shard sample; `splice(value)`: (the ids a medium part becomes, its payload)."""

    def decode(self, data: bytes, name: str, ext: str, /) -> Any: ...

    def plain(self, raw: dict[str, Any], ext: str, /) -> Any: ...

    def splice(self, value: Any, /) -> tuple[list[int], Any]: ...


def _none(*_args: object, **_kw: object) -> None:
    return None


def _unchanged(_model: object, h_BTD: torch.Tensor, _input_ids: object, _state: object) -> torch.Tensor:
    return h_BTD


def _no_blocks(_model: object, _state: object) -> dict[int, list[Block]]:
    return {}


def _same_state(state: S, _start: int, _n: int) -> S:
    return state


@dataclass(frozen=True)
class PartHooks(Generic[P, S]):
    """The model concern. `build(tower, cfg, parts)`: a fresh part (cfg: the training config's `model` section;
    parts: those already built, in registry order); `base_parts(tower, cfg)`: the parts it `requires` when a run
    trains it alone (video: its image part), each a module or an adapter file's path (the caller loads it; frozen);
    `meta(part)` / `from_meta(tower, meta, parts, source)`: what an adapter file records to rebuild the part's
    modules (its weights are the part's state_dict); `row_table(parts)`: (the embedding its token ids read, the row
    the first id reads)."""

    Config: type
    build: Callable[[Transformer, Any, dict[str, nn.Module]], P]
    meta: Callable[[P], dict[str, Any]]
    from_meta: Callable[[Transformer, dict[str, Any], dict[str, nn.Module], str], P]
    row_table: Callable[[Mapping[str, nn.Module]], tuple[nn.Embedding, int]]
    inputs: tuple[str, ...]  # the batch keys it consumes (ComposedModel.forward keyword arguments)
    # (model, input_ids, inputs, cache_kv) -> state, or None when there is nothing to do
    prepare: Callable[[ComposedModel, torch.Tensor, dict[str, Any], bool], S | None]
    # (model, h_BTD, input_ids, state) -> h_BTD
    input_rows: Callable[[ComposedModel, torch.Tensor, torch.Tensor, S], torch.Tensor] = _unchanged
    # (model, state) -> {tower layer: [h -> h]}
    blocks: Callable[[ComposedModel, S], Mapping[int, Sequence[Block]]] = _no_blocks
    step_state: Callable[[S, int, int], S | None] = _same_state  # the state for layout positions [start, start + n)
    # (model, state, input_ids, labels): summed, or None
    aux_loss: Callable[[ComposedModel, S, torch.Tensor, torch.Tensor], torch.Tensor | None] = _none
    base_parts: Callable[[Transformer, Any], Mapping[str, nn.Module | str]] = lambda tower, cfg: {}
    encoders: Callable[[P], list[nn.Module]] = lambda part: []  # its media encoders (optim.encoder_lr_scale)


@dataclass(frozen=True)
class DataHooks:
    """The data concern. `media(model, tok, opts, cfg)`: a picklable maker (DataLoader workers receive it; it holds
    no model) with `decode(data, name, ext)` -> the decoded medium, `plain(raw, ext)` -> the medium of a plain
    (one medium + text) shard sample, and `splice(value)` -> (the ids a medium part becomes, its payload); `opts`:
    AnswerOptions (prompt, frames, language), `cfg`: the training config's `model` section or None.
    `turn(part, opts)`: the user turn of a caption/transcript request for one medium part (the medium and the
    prompt, in the order the plug-in trains on). `collate(items)`: the batch inputs from the items' payload lists
    (`item[name]`), nothing when no item has any."""

    medium: Medium
    media: Callable[[ComposedModel, Tokenizer, AnswerOptions, Any], MediaMaker]
    turn: Callable[[Part, AnswerOptions], list[Part]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class InferenceHooks:
    """The inference concern. `requests(model, tok, data, name, ext, opts)` -> (generation items, the medium's
    length in seconds or None): the items (prompt ids + inputs, laid out as training lays out a plain sample) for
    one file's bytes (speech: one per 30 s piece), whose answers `join` puts together. `stop_ids(tok)`: extra ids
    that end an answer; `finish(text)`: an answer's last clean-up. Bad bytes raise a SampleError naming `name`."""

    what: str  # what an answer is called ("caption", "transcript")
    requests: Callable[
        [ComposedModel, Tokenizer, bytes, str, str, AnswerOptions], tuple[list[dict[str, Any]], float | None]
    ]
    join: Callable[[list[str]], str] = lambda texts: " ".join(t for t in texts if t)
    stop_ids: Callable[[Tokenizer], AbstractSet[int]] = lambda tok: set()
    finish: Callable[[str], str] = str.strip


@dataclass(frozen=True)
class EvalHooks:
    metrics: Callable[[list[str], list[str]], dict[str, Any]]  # (references, hypotheses) -> corpus metrics


@dataclass(frozen=True)
class ScaleHooks(Generic[P]):
    """`shard_units(part)`: large repeated blocks, one FSDP2 unit each under `parallel.adapters=fsdp` (and what
    activation checkpointing recomputes); `plan_pieces(part, parts, batch, seq_len, dtype, cfg)`: the memory plan's
    view of its training forward (adapters/plan.py); `file_options`: its config options that name weight files (the
    plan, which needs shapes only, leaves them out)."""

    shard_units: Callable[[P], list[nn.Module]] = lambda part: []
    plan_pieces: Callable[[P, dict[str, nn.Module], int, int, torch.dtype, Any], PlanPieces] | None = None
    file_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Modality(Generic[P, S]):
    """A plug-in: its name, adapter-file format, token ids, and one group of hooks per concern (`P`: its part's
    type, `S`: its forward state's)."""

    name: str
    format: str  # the adapter file's metadata "format"
    rows: int  # token ids it needs after the tower's vocabulary (ranges allocated by the registry)
    part: PartHooks[P, S]
    data: DataHooks
    inference: InferenceHooks
    evaluation: EvalHooks
    scale: ScaleHooks[P] = field(default_factory=lambda: ScaleHooks())
    requires: tuple[str, ...] = ()  # parts it sits on (registered before it)

    @property
    def exts(self) -> tuple[str, ...]:
        return self.data.medium.exts


def media_member(sample: dict, exts: tuple[str, ...]) -> str | None:
    """The sample's member key holding media of one of these extensions (None if it has none)."""
    return next((e for e in exts if e in sample), None)


def require_member(raw: dict, medium: Medium) -> str:
    """The sample's member holding this medium, or a counted SampleError naming the sample."""
    if "__too_large__" in raw:
        raise SampleError("member_too_large", raw["__too_large__"])
    ext = media_member(raw, medium.exts)
    if ext is None:
        raise SampleError(f"missing_{medium.name}", f"{raw['__shard__']}:{raw['__key__']}: no {medium.name} member")
    return ext


def decode_member(raw: dict, medium: Medium, **kw: Any) -> Any:
    """The sample's medium, decoded (a SampleError naming the sample when it does not decode)."""
    ext = require_member(raw, medium)
    return medium.decode(raw[ext], raw["__key__"], ext, **kw)
