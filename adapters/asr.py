"""Transcribing 16 kHz waveforms with a composed model's speech part (benchmarks, tests and the demo's corpora call
it; files go through `adapters.generation.answer_file`): the speech plug-in's requests, one batched decode, its
decoding rules (one line; a runaway loop at the end collapsed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mm_llama.text import collapse_loop, first_line

from .composed import ComposedModel
from .generation import generate_items
from .modalities.speech import finish
from .modality import AnswerOptions
from .samples import plain_requests


def transcribe(
    model: ComposedModel,
    tok,
    waves: Sequence[torch.Tensor],
    *,
    language: str = "English",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    on_token=None,
    one_line: bool = True,
    collapse_loops: bool = True,
) -> list[str]:
    """One transcript per clip (each at most 30 s). `one_line`: decoding stops at a token that begins a new line and
    the text is cut at its first line break; `collapse_loops`: a runaway loop at the end keeps one copy of its
    phrase. Both are on for every answer the project gives; off, the raw decode is returned (stripped)."""
    texts = generate_items(
        model,
        tok,
        plain_requests(model, tok, "speech", waves, "clip", AnswerOptions(language=language)),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_ids=tok.ids_starting_with(b"\n") if one_line else set(),
        on_token=on_token,
    )
    if one_line and collapse_loops:
        return [finish(t) for t in texts]
    texts = [first_line(t) if one_line else t.strip() for t in texts]
    return [collapse_loop(t) for t in texts] if collapse_loops else texts
