"""Answers from the composed model: items (prompt ids + the plug-ins' inputs, the same layout training uses) ->
one left-padded batch -> each plug-in's state prepared ONCE per request (media encoded, cross-attention keys and
values computed) -> prefill + decode over `ComposedModel.forward` with the tower's KV cache.

The batch is laid out as `mm_llama.generate.generate_ids` decodes it (`left_padded`: prompts right-aligned, the new
tokens' slots after them), and the states are prepared over that whole layout, so a generated token sees what the
last prompt token sees; each model call gets its positions' slice (`ComposedModel.step_states`). Computation runs
as in training: under autocast of the tower's dtype when it is 16-bit (`ComposedModel.compute_context`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mm_llama.data.collate import collate_text, pack, pad_sequences
from mm_llama.generate import generate_ids, left_padded, padding_id

from .composed import ComposedModel
from .modality import AnswerOptions, require_member
from .registry import MODALITIES


class Collate:
    """Items -> a batch: right-padded input_ids and labels + each plug-in's inputs (a plug-in collates the items that
    hold its input and adds nothing when none does). `pack_tokens` > 0: the items are first packed into as few rows
    of at most that many tokens as first-fit allows (data.collate.pack), and the batch gets `segment_ids` (each
    position's sample in its row, -1 padding), from which the model builds block-diagonal attention, positions
    restarting per sample and each sample's own media. Picklable: it names the modalities, it holds no model."""

    def __init__(self, kinds: Sequence[str], pad_id: int = 0, pack_tokens: int = 0):
        self.kinds, self.pad_id, self.pack_tokens = list(kinds), pad_id, pack_tokens

    def inputs(self, items: Sequence[dict]) -> dict:
        out: dict = {}
        for kind in self.kinds:
            out.update(MODALITIES[kind].data.collate(list(items)))
        return out

    def __call__(self, items: Sequence[dict]) -> dict:
        if self.pack_tokens:
            items = pack(items, self.pack_tokens)
        text = collate_text(items, pad_id=self.pad_id)
        out = {"input_ids": text["input_ids"], "labels": text["labels"], **self.inputs(items)}
        if self.pack_tokens:
            out["segment_ids"] = pad_sequences([it["segment_ids"] for it in items], -1)
        return out


@torch.inference_mode()
def generate_items(
    model: ComposedModel,
    tok,
    items: Sequence[dict],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The decoded completion of every item (one batch; stop tokens: the tokenizer's and `stop_ids`)."""
    prompts = [list(it["input_ids"]) for it in items]
    pad = padding_id(tok)
    device = model.tok_embeddings.weight.device
    layout = left_padded(prompts, pad, max_new_tokens).to(device)
    inputs = {k: to_device(v, device) for k, v in Collate(model.kinds).inputs(items).items()}
    with model.compute_context():
        states = model.states(layout, inputs, cache_kv=True)

        def forward_extra(_pad: int, start: int, n: int) -> dict:
            return {"states": model.step_states(states, start, n)}

        out = generate_ids(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=set(tok.stop_ids) | set(stop_ids or ()),
            pad_id=pad,
            seed=seed,
            on_token=on_token,
            forward_extra=forward_extra,
        )
    return [tok.decode(o) for o in out]


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def answer_file(model: ComposedModel, tok, kind: str, data: bytes, name: str, opts: AnswerOptions):
    """(answer, media seconds or None) for one file's bytes, by its plug-in: its requests (speech: one per 30 s
    piece) in one batch, each answer finished by the plug-in's rule, then joined."""
    hooks = MODALITIES[kind].inference
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    items, seconds = hooks.requests(model, tok, data, name, ext, opts)
    texts = generate_items(
        model,
        tok,
        items,
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
        stop_ids=hooks.stop_ids(tok),
        on_token=opts.on_token,
    )
    return hooks.join([hooks.finish(t) for t in texts]), seconds


def answer_samples(model: ComposedModel, tok, kind: str, samples: Sequence[dict], opts: AnswerOptions) -> list[str]:
    """One answer per raw shard sample of one kind, in one batch (evaluation: one request per sample)."""
    spec = MODALITIES[kind]
    items = []
    for raw in samples:
        ext = require_member(raw, spec.data.medium)
        name = f"{raw.get('__shard__', '')}:{raw['__key__']}"
        got, _ = spec.inference.requests(model, tok, raw[ext], name, ext, opts)
        if len(got) != 1:
            raise ValueError(f"{name}: makes {len(got)} requests (e.g. long audio): answer it with answer_file")
        items += got
    texts = generate_items(
        model,
        tok,
        items,
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
        stop_ids=spec.inference.stop_ids(tok),
    )
    return [spec.inference.finish(t) for t in texts]
