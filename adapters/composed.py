"""The one model: a frozen Llama 3 tower + any subset of the registered parts (image, video, speech), and its one
forward, used by training, generation (captions, transcripts, the CLI, the web page), evaluation and export.

The tower has one layer loop (`Transformer.forward`) with two extension points, which is all composition uses:
- input rows, `embeds=`: the token embeddings, where ids >= the tower's vocabulary V read each modality's own
  learnable rows (ranges allocated by the registry) and plug-ins may replace rows (speech splices its adapter's
  outputs into its `<|speech|>` positions);
- added blocks, `inject={layer: [block(h) -> h, ...]}`: run before that tower layer (n_layers: after the last);
  here the image and video cross-attention blocks (video blocks first where both sit before one layer).
What each modality does is its plug-in's (adapters/modalities/, listed in adapters/registry.py): this module names
none of them.

Composition is exact: a sequence with no media of a kind is untouched by that kind's part (its blocks are skipped
when no sample in the batch has such media, and give exactly zero for rows that see none), so text-only rows equal
the bare tower, and each input's output equals the model with that one part alone.

`model(input_ids, ..., labels=labels)` follows the Hugging Face training convention: `labels` aligned with
`input_ids` (-100 = ignore); logits are computed only at positions whose next token is a label; `.loss` is the mean
over labelled tokens (`.loss_sum` and `.n_tokens` for a global normalisation across ranks). Generation passes
`states=` (each plug-in's state prepared once per request, `step_states` slicing it to the positions of a call)
together with the tower's `positions`, `mask` and KV `cache`.

Shape legend: B batch, T tokens, D tower width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.data.collate import segment_bounds, segment_positions
from mm_llama.llama.model import Documents, Transformer

from .registry import MODALITIES, get_modality, token_rows


@dataclass
class ModelOutput:
    """What `ComposedModel.forward` returns: logits (all positions, the last, or [N, V] at the selected/labelled
    ones), and with `labels=` the mean loss over labelled tokens, its sum and the number of labelled tokens;
    `aux_sum`: the plug-ins' auxiliary training losses (e.g. speech CTC), summed, which training adds to `loss_sum`
    (None: none)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_tokens: int = 0
    aux_sum: torch.Tensor | None = None


def label_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: positions whose NEXT token is a label (where logits are needed)."""
    select = torch.zeros_like(labels_BT, dtype=torch.bool)
    select[:, :-1] = labels_BT[:, 1:] != -100
    return select


def keep_frozen_in_eval(module: nn.Module) -> None:
    """Frozen means frozen: every submodule whose parameters all have requires_grad False goes to eval mode (its
    dropout and batch statistics do not depend on training)."""
    for m in list(module.modules())[1:]:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


class ComposedModel(nn.Module):
    """tower + one part per loaded modality (`model.image`, `model.video`, `model.speech`), all on ONE tower. A
    part's `requires` (video: image) must be among the parts."""

    def __init__(self, tower: Transformer, parts: Mapping[str, nn.Module] | None = None, **named: nn.Module):
        super().__init__()
        parts = {**(parts or {}), **{k: v for k, v in named.items() if v is not None}}
        for kind in parts:
            for need in get_modality(kind).requires:
                if need not in parts:
                    raise ValueError(f"the {kind} adapter needs a {need} adapter")
        for kind, part in parts.items():
            if isinstance(part, Transformer) or any(m is tower for m in part.modules()):
                raise ValueError(f"the {kind} part holds a tower: parts hold only their own weights")
        self.tower = tower
        self.kinds = [k for k in MODALITIES if k in parts]  # registry order
        for kind in self.kinds:
            self.add_module(kind, parts[kind])
        rows = token_rows()
        self.token_rows = {k: rows[k] for k in self.kinds}
        self.aux_only = False  # train on the auxiliary losses only, the tower skipped (recipes: objective=aux)
        self.tower.requires_grad_(False)
        self.train(False)

    # --- what generation and the recipes read ---------------------------------------------------
    @property
    def args(self):
        return self.tower.args

    @property
    def tok_embeddings(self):
        return self.tower.tok_embeddings

    @property
    def modalities(self) -> list[str]:
        return list(self.kinds)

    @property
    def parts(self) -> dict[str, nn.Module]:
        return {k: getattr(self, k) for k in self.kinds}

    def part(self, kind: str) -> nn.Module:
        if kind not in self.kinds:
            raise KeyError(f"no {kind} adapter in this model (it has: {', '.join(self.kinds) or 'none'})")
        return getattr(self, kind)

    def token_id(self, kind: str) -> int:
        """The id of a modality's first token (`<|image|>`, `<|video|>`, `<|speech|>`)."""
        self.part(kind)
        return self.tower.args.vocab_size + self.token_rows[kind][0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()
        keep_frozen_in_eval(self)
        return self

    def shard_units(self) -> list[nn.Module]:
        """Every part's large repeated blocks (plug-ins' `shard_units`), once each: what `parallel.adapters=fsdp`
        shards and activation checkpointing recomputes."""
        units: list[nn.Module] = []
        for kind in self.kinds:
            units += [u for u in MODALITIES[kind].scale.shard_units(self.part(kind)) if u not in units]
        return units

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of the parts' media encoders (the plug-ins' `encoders`)."""
        return [p for k in self.kinds for m in MODALITIES[k].part.encoders(self.part(k)) for p in m.parameters()]

    def compute_context(self):
        """Generation and evaluation compute as training did: under autocast of the tower's weight dtype when that
        is a 16-bit type (the parts stay fp32), plainly for an fp32 tower."""
        dtype = self.tower.tok_embeddings.weight.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.tower.tok_embeddings.weight.device.type, dtype=dtype)

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings: the frozen table below V, each modality's learnable rows in its own id range."""
        V = self.tower.args.vocab_size
        h = self.tower.tok_embeddings(input_ids_BT.clamp(max=V - 1))
        for kind, (start, n) in self.token_rows.items():
            sel = (input_ids_BT >= V + start) & (input_ids_BT < V + start + n)
            if sel.any():
                table, first = MODALITIES[kind].part.row_table(self.parts)
                rows = table((input_ids_BT - V - start + first).clamp(0, table.num_embeddings - 1))
                h = torch.where(sel[..., None], rows.to(h.dtype), h)
        return h

    def states(self, input_ids_BT: torch.Tensor, media: Mapping, *, cache_kv: bool = False, segment_ids=None) -> dict:
        """Each loaded modality's state for these inputs (modalities without inputs are left out). `cache_kv`: the
        blocks' keys/values computed once here (generation), not in each block's forward (training).
        `segment_ids` [B, T] (packed rows; -1 padding): every plug-in reads it as the input `segment_ids`, so each
        sample sees only its own media."""
        known = {k for m in self.kinds for k in MODALITIES[m].part.inputs}
        unknown = sorted(k for k, v in media.items() if v is not None and k not in known)
        if unknown:
            loaded = ", ".join(self.kinds) or "none"
            raise ValueError(f"inputs {unknown} belong to no loaded adapter (loaded: {loaded})")
        out = {}
        for kind in self.kinds:
            hooks = MODALITIES[kind].part
            inputs = {k: media.get(k) for k in hooks.inputs}
            state = hooks.prepare(self, input_ids_BT, {**inputs, "segment_ids": segment_ids}, cache_kv)
            if state is not None:
                out[kind] = state
        return out

    def step_states(self, states: dict, start: int, n: int) -> dict:
        """The states prepared over a whole generation layout, for its positions [start, start + n)."""
        out = {}
        for kind, state in states.items():
            s = MODALITIES[kind].part.step_state(state, start, n)
            if s is not None:
                out[kind] = s
        return out

    def blocks(self, states: dict) -> dict[int, list]:
        """The blocks to inject into the tower's layer loop (later modalities first where they share a layer)."""
        inject: dict[int, list] = {}
        for kind in reversed(self.kinds):
            if kind in states:
                for layer, fns in MODALITIES[kind].part.blocks(self, states[kind]).items():
                    inject.setdefault(layer, []).extend(fns)
        return inject

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
        states: dict | None = None,
        segment_ids: torch.Tensor | None = None,
        **media,
    ) -> ModelOutput:
        """input_ids [B, T]; media keyword arguments as the plug-ins name them (any may be absent): images as
        transformers' Mllama (pixel_values [B, I, N, C, H, W], aspect_ratio_ids/mask; cross_attention_mask
        [B, T, I, N], built from the `<|image|>` positions when not given); videos: per sample frames [F, C, H, W] or
        None; speech_features: per sample [frames, n_mels] or None. `states`: prepared states instead of media
        (generation). labels [B, T] (-100 ignored): logits only where the next token is a label, plus the loss.
        segment_ids [B, T]: packed rows (each position's sample, -1 padding): attention is causal within each sample
        (per-sample attention, `Documents`), positions restart at each sample and every sample reads only its own
        media."""
        if segment_ids is not None:
            positions = segment_positions(segment_ids) if positions is None else positions
            mask = Documents([segment_bounds(row) for row in segment_ids.tolist()]) if mask is None else mask
        if states is None:
            states = self.states(input_ids, media, segment_ids=segment_ids)
        if self.aux_only and labels is not None and self.training:
            return self._aux_only(states, input_ids, labels)
        h = self.embed(input_ids)
        for kind, state in states.items():
            h = MODALITIES[kind].part.input_rows(self, h, input_ids, state)
        if labels is not None and select is None:
            select = label_positions(labels)
        logits = self.tower(
            embeds=h,
            positions=positions,
            mask=mask,
            cache=cache,
            last_only=last_only,
            select=select,
            inject=self.blocks(states),
        )
        if labels is None:
            return ModelOutput(logits)
        targets = labels[:, 1:][select[:, :-1]]  # row-major, as logits[select]
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        if self.training and not loss_sum.requires_grad:
            loss_sum = loss_sum + self._zero_through()
        n = int(targets.numel())
        aux = self._aux_losses(states, input_ids, labels)
        return ModelOutput(logits, loss_sum / max(n, 1), loss_sum, n, sum(aux) if aux else None)

    def _zero_through(self) -> torch.Tensor:
        """0 with a graph to every trainable parameter, for a training batch that reached none (e.g. text-only
        samples in an image run): backward still runs, so data-parallel reductions happen on every rank in step
        (the parameters' gradients are 0 for that step)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1] * 0).sum() for p in params) if params else torch.zeros(())

    def _aux_losses(self, states: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for kind, state in states.items():
            aux = MODALITIES[kind].part.aux_loss(self, state, input_ids, labels)
            if aux is not None:
                out.append(aux)
        return out

    def _aux_only(self, states: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """Training with `aux_only`: the plug-ins' auxiliary losses without the tower (loss per labelled token)."""
        aux = self._aux_losses(states, input_ids, labels)
        if not aux:
            raise ValueError(f"aux_only training, but no loaded part has an auxiliary loss ({', '.join(self.kinds)})")
        total = sum(aux)
        n = int((labels[:, 1:] != -100).sum())
        return ModelOutput(None, total / max(n, 1), total, n)
