"""What a modality plug-in declares (one module per modality under adapters/modalities/, listed in
adapters/registry.py). The composed model, the training recipe, evaluation, the demo, the CLI and the web page only
call these methods; none of them names a modality.

A plug-in says
- its options (`Config`, the `model.<name>` section of a training config) and how to build and freeze its part on
  a tower (`build`), save and load the part's trainable weights (`save` / `load`, the adapter file's `format`);
- its token ids (`token_rows`: offset from the tower's vocabulary V, count, first row of `row_table(part)`) and
  which other parts it sits on (`requires`);
- how it enters the tower's one layer loop: `prepare` turns its forward inputs (`inputs`: batch keys) into a
  state, `input_rows` changes the input embeddings (speech splices rows), `blocks` adds blocks before tower layers
  (image and video cross-attention);
- how a webdataset sample becomes model inputs (`sample_maker`, picklable for DataLoader workers) and how a list
  of them is batched (`collate`);
- how to answer a media file (`answer`: the CLI and the web page) and how to score held-out samples (`hypotheses`
  + `metrics`, recipes/evaluate.py and the demo).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AnswerOptions:
    prompt: str = ""
    frames: int = 8
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    language: str = "English"
    on_token: Callable | None = None


class Modality:
    name: str = ""
    exts: tuple[str, ...] = ()  # media file extensions it answers
    what: str = ""  # what an answer is called on the web page ("caption", "transcript")
    format: str = ""  # the adapter file's metadata "format"
    token_rows: tuple[int, int, int] = (0, 0, 0)
    requires: tuple[str, ...] = ()  # parts it is built on (video: image)
    inputs: tuple[str, ...] = ()  # ComposedModel.forward keyword arguments it consumes
    Config: type = object  # its options: the `model.<name>` section of a training config

    # --- building, files ------------------------------------------------------------------------
    def build(self, tower, cfg, parts: dict) -> nn.Module:
        """A fresh trainable part on `tower` (tower frozen); cfg: the training config's `model` section."""
        raise NotImplementedError

    def save(self, part: nn.Module, path) -> None:
        raise NotImplementedError

    def load(self, tower, path, parts: dict) -> nn.Module:
        raise NotImplementedError

    def row_table(self, part: nn.Module) -> nn.Embedding:
        raise NotImplementedError

    # --- the composed forward -------------------------------------------------------------------
    def prepare(self, model, input_ids: torch.Tensor, inputs: dict):
        """State for `input_rows` / `blocks` from this modality's forward inputs (None: nothing to do)."""
        return None

    def input_rows(self, model, h_BTD: torch.Tensor, input_ids: torch.Tensor, state) -> torch.Tensor:
        return h_BTD

    def blocks(self, model, state) -> dict[int, list]:
        return {}

    def aux_loss(self, model, state, input_ids: torch.Tensor, labels: torch.Tensor | None):
        """An auxiliary training loss (summed over the batch, in the units of the summed token loss) or None."""
        return None

    def shard_units(self, part: nn.Module) -> list[nn.Module]:
        """The part's large repeated blocks (each called through its own `forward`), one FSDP2 unit each when a
        run shards the adapters (`parallel.adapters=fsdp`); the rest of the part stays replicated."""
        return []

    def plan_pieces(self, part: nn.Module, batch: int, seq_len: int, dtype: torch.dtype, cfg):
        """The memory plan's view of this part's training forward (adapters/plan.py `PlanPieces`): its encoder and
        blocks as pieces run on the meta device with `batch` samples of `seq_len` tokens in `dtype`; cfg: the
        training config's `model` section (e.g. frames per video)."""
        raise NotImplementedError(f"no memory plan for the {self.name} adapter")

    # --- data -----------------------------------------------------------------------------------
    def sample_maker(self, model, tok, cfg) -> Callable[[dict], dict]:
        """raw webdataset sample -> {input_ids, labels, <media>} (picklable; holds no model). cfg: the full
        training config (its data section has the prompt and text length)."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        """This modality's forward inputs for a batch of sample-maker items."""
        return {}

    # --- inference and evaluation ---------------------------------------------------------------
    def answer(self, model, tok, name: str, data: bytes, opts: AnswerOptions) -> tuple[str, float | None]:
        """(text, media seconds or None) for one file."""
        raise NotImplementedError

    def hypotheses(self, model, tok, samples: list[dict], opts: AnswerOptions) -> list[str]:
        """One answer per raw webdataset sample (batched)."""
        raise NotImplementedError

    def metrics(self, references: list[str], hypotheses: list[str]) -> dict:
        raise NotImplementedError


def media_member(sample: dict, exts: tuple[str, ...]) -> str | None:
    """The sample's member key holding media of one of these extensions (None if it has none)."""
    return next((e for e in exts if e in sample), None)


def text_target(tok, raw: dict, max_text_tokens: int) -> list[int]:
    """The sample's caption / transcript as target ids (leading space, truncated, then end of sequence)."""
    from mm_llama.data.badsamples import SampleError

    if "txt" not in raw:
        raise SampleError("missing_text", f"{raw['__shard__']}:{raw['__key__']}: no .txt")
    return tok.encode(" " + raw["txt"].decode("utf-8").strip())[:max_text_tokens] + [tok.eos_id]


def require_member(raw: dict, exts: tuple[str, ...], what: str) -> str:
    """The sample's media member of one of these extensions, or a counted SampleError naming the sample."""
    from mm_llama.data.badsamples import SampleError

    if "__too_large__" in raw:
        raise SampleError("member_too_large", raw["__too_large__"])
    ext = media_member(raw, exts)
    if ext is None:
        raise SampleError(f"missing_{what}", f"{raw['__shard__']}:{raw['__key__']}: no {what} member")
    return ext
