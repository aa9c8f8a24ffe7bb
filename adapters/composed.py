"""One composed model: a frozen Llama 3 tower + any subset of the image, video and speech adapters.

The tower has one layer loop (`Transformer.forward`) and two extension points, which is all composition uses:
- input rows, `embeds=`: the token embeddings, where ids >= the tower's vocabulary V read each modality's own
  learnable rows and speech placeholders are replaced by the speech adapter's outputs;
- added blocks, `inject={layer: [block(h) -> h, ...]}`: run before that tower layer (n_layers: after the last);
  here the image and video cross-attention blocks (video blocks first where both sit before one layer, as in the
  paper's video model).

Token rows (`TOKEN_ROWS`, offsets from V; saved in each adapter file, so any combination loads):
    image   V .. V+7   `<|image|>` = V and 7 reserved rows: Llama 3.2 Vision's 8 learnable rows, the image
                       adapter's table
    video   V+8        `<|video|>`: row 1 of the image adapter's table (what the video stage trains on, frozen;
                       so a video adapter always travels with its image adapter)
    speech  V+9        `<|speech|>` placeholder: row 0 of the speech adapter's table; each placeholder position
                       receives one output row of the speech adapter
The single-modality models keep their own ids (image V, video V+1, speech V); `ComposedModel.token_id(kind)`
gives the composed ones. What each modality does here is its plug-in's (adapters/modalities/, listed in
adapters/registry.py): this module names none of them.

Composition is exact: a sequence with no media of a kind is untouched by that kind's adapter (its cross-attention
blocks are skipped when no sample in the batch has such media, and give exactly zero for rows that see none when
some do), so text-only rows equal the bare tower, and each input's output equals the single-adapter model's.

`model(input_ids, ..., labels=labels)` follows the Hugging Face training convention: `labels` aligned with
`input_ids` (-100 = ignore); logits are computed only at positions whose next token is a label; `.loss` is the mean
over labelled tokens (`.loss_sum` and `.n_tokens` for a global normalisation across ranks).

Shape legend: B batch, T tokens, D tower width, S media tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.llama.model import Transformer

from .registry import MODALITIES, get_modality, modality_for_format


@dataclass
class ModelOutput:
    """What `ComposedModel.forward` returns: logits (all positions, or [N, V] at the selected/labelled ones), and with
    `labels=` the mean loss over labelled tokens, its sum and the number of labelled tokens; `aux_sum`: the plug-ins'
    auxiliary training losses (e.g. speech CTC), summed, which training adds to `loss_sum` (None: none)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_tokens: int = 0
    aux_sum: torch.Tensor | None = None


def label_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: positions whose NEXT token is a label (where logits are needed)."""
    select = torch.zeros_like(labels_BT, dtype=torch.bool)
    select[:, :-1] = labels_BT[:, 1:] != -100
    return select


class ComposedModel(nn.Module):
    """tower + one part per loaded modality (`model.image`, `model.video`, `model.speech`: the single-modality
    models, all on ONE tower object). A part's `requires` (video: image) must be given or be reachable from it."""

    def __init__(self, tower: Transformer, token_rows: dict[str, tuple[int, int, int]] | None = None, **parts):
        super().__init__()
        parts = {k: v for k, v in parts.items() if v is not None}
        for kind in parts:
            get_modality(kind)  # a known modality
        if "video" in parts:  # the video model brings its image model
            image = parts["video"].image_model
            if parts.get("image", image) is not image:
                raise ValueError("the video adapter was built on another image model than the one given")
            parts["image"] = image
        for kind, part in parts.items():
            if part.tok_embeddings is not tower.tok_embeddings:
                raise ValueError(f"the {kind} adapter sits on another tower object; compose adapters on one tower")
            for need in get_modality(kind).requires:
                if need not in parts:
                    raise ValueError(f"the {kind} adapter needs a {need} adapter")
        if "image" in parts and parts["image"].image_token_id != tower.args.vocab_size:
            raise ValueError(f"the image adapter's <|image|> id is {parts['image'].image_token_id}, composition "
                             f"needs {tower.args.vocab_size} (the first id after the tower's vocabulary)")  # fmt: skip
        self.tower = tower
        self.kinds = [k for k in MODALITIES if k in parts]  # registry order
        for kind in self.kinds:
            self.add_module(kind, parts[kind])
        rows = {k: tuple((token_rows or {}).get(k, MODALITIES[k].token_rows)) for k in self.kinds}
        spans = sorted((start, start + n, k) for k, (start, n, _) in rows.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"token rows of {a} and {b} overlap: {rows}")
        self.token_rows = rows
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

    def part(self, kind: str) -> nn.Module:
        if kind not in self.kinds:
            raise KeyError(f"no {kind} adapter in this model (it has: {', '.join(self.kinds) or 'none'})")
        return getattr(self, kind)

    def token_id(self, kind: str) -> int:
        """The composed id of a modality's first token (`<|image|>`, `<|video|>`, `<|speech|>`)."""
        self.part(kind)
        return self.tower.args.vocab_size + self.token_rows[kind][0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen means frozen: the parts keep their own frozen pieces in eval mode
        for kind in self.kinds:
            getattr(self, kind).train(mode)
        return self

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings: the frozen table below V, each modality's learnable rows in its own id range."""
        V = self.tower.args.vocab_size
        h = self.tower.tok_embeddings(input_ids_BT.clamp(max=V - 1))
        for kind, (start, n, local) in self.token_rows.items():
            sel = (input_ids_BT >= V + start) & (input_ids_BT < V + start + n)
            if sel.any():
                table = MODALITIES[kind].row_table(getattr(self, kind))
                rows = table((input_ids_BT - V - start + local).clamp(0, table.num_embeddings - 1))
                h = torch.where(sel[..., None], rows.to(h.dtype), h)
        return h

    def states(self, input_ids_BT: torch.Tensor, media: dict) -> dict:
        """Each loaded modality's state for these inputs (modalities without inputs are left out)."""
        known = {k for m in self.kinds for k in MODALITIES[m].inputs}
        unknown = sorted(k for k, v in media.items() if v is not None and k not in known)
        if unknown:
            raise ValueError(
                f"inputs {unknown} belong to no loaded adapter (loaded: {', '.join(self.kinds) or 'none'})"
            )
        out = {}
        for kind in self.kinds:
            spec = MODALITIES[kind]
            state = spec.prepare(self, input_ids_BT, {k: media.get(k) for k in spec.inputs})
            if state is not None:
                out[kind] = state
        return out

    def blocks(self, states: dict) -> dict[int, list]:
        """The blocks to inject into the tower's layer loop (later modalities first where they share a layer)."""
        inject: dict[int, list] = {}
        for kind in reversed(self.kinds):
            if kind in states:
                for layer, fns in MODALITIES[kind].blocks(self, states[kind]).items():
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
        **media,
    ) -> ModelOutput:
        """input_ids [B, T] with composed token ids; media keyword arguments as the plug-ins name them (any may be
        absent): images as transformers' Mllama (pixel_values [B, I, N, C, H, W], aspect_ratio_ids/mask,
        cross_attention_mask [B, T, I, N]; samples without images have all-zero mask rows); videos: per sample
        frames [F, C, H, W] or None; speech_features: per sample [frames, n_mels] or None. Precomputed forms for
        generation: image_state / video_state (rows for exactly these positions), speech (adapter rows, prefill).
        labels [B, T] (-100 ignored): logits only where the next token is a label, plus the loss."""
        states = self.states(input_ids, media)
        if self.aux_only and labels is not None and self.training:
            return self._aux_only(states, input_ids, labels)
        h = self.embed(input_ids)
        for kind, state in states.items():
            h = MODALITIES[kind].input_rows(self, h, input_ids, state)
        if labels is not None and select is None:
            select = label_positions(labels)
        logits = self.tower(embeds=h, positions=positions, mask=mask, cache=cache, last_only=last_only,
                            select=select, inject=self.blocks(states))  # fmt: skip
        if labels is None:
            return ModelOutput(logits)
        targets = labels[:, 1:][select[:, :-1]]  # row-major, as logits[select]
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        n = int(targets.numel())
        aux = self._aux_losses(states, input_ids, labels)
        return ModelOutput(logits, loss_sum / max(n, 1), loss_sum, n, sum(aux) if aux else None)

    def _aux_losses(self, states: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return [a for k, st in states.items() if (a := MODALITIES[k].aux_loss(self, st, input_ids, labels)) is not None]

    def _aux_only(self, states: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """Training with `aux_only`: the plug-ins' auxiliary losses without the tower (loss per labelled token)."""
        aux = self._aux_losses(states, input_ids, labels)
        if not aux:
            raise ValueError(f"aux_only training, but no loaded part has an auxiliary loss ({', '.join(self.kinds)})")
        total = sum(aux)
        n = int((labels[:, 1:] != -100).sum())
        return ModelOutput(None, total / max(n, 1), total, n)


# --- adapter files of any kind, in any order, onto one tower ----------------------------------------------
def adapter_kind(path) -> str:
    """The modality of an adapter file, read from its metadata."""
    from mm_llama.llama.checkpoint import CheckpointError

    from .checkpoint import read_adapter_meta

    fmt = read_adapter_meta(path).get("format")
    spec = modality_for_format(fmt)
    if spec is None:
        known = ", ".join(m.format for m in MODALITIES.values())
        raise CheckpointError(f"{path}: unknown adapter format {fmt!r} (known: {known})")
    return spec.name


def load_composed(tower: Transformer, paths) -> ComposedModel:
    """Load adapter files of any kind (read from each file) onto `tower`: at most one per kind, a part's
    `requires` among them. Token rows come from the files (files written before they were saved get the
    default layout)."""
    from mm_llama.llama.checkpoint import CheckpointError

    from .checkpoint import read_adapter_meta

    by_kind: dict[str, str] = {}
    rows: dict[str, tuple] = {}
    for p in paths:
        kind = adapter_kind(p)
        if kind in by_kind:
            raise CheckpointError(f"two {kind} adapters given: {by_kind[kind]} and {p} (one per kind)")
        by_kind[kind] = str(p)
        rows.update({k: tuple(v) for k, v in read_adapter_meta(p).get("token_rows", {}).items()})
    parts: dict[str, nn.Module] = {}
    for kind, spec in MODALITIES.items():  # registry order: what a part requires loads first
        if kind not in by_kind:
            continue
        for need in spec.requires:
            if need not in by_kind:
                raise CheckpointError(
                    f"{by_kind[kind]}: a {kind} adapter runs on its {need} adapter: pass that one too"
                )
        parts[kind] = spec.load(tower, by_kind[kind], parts)
    try:
        return ComposedModel(tower, token_rows=rows, **parts).eval()
    except ValueError as e:
        raise CheckpointError(f"{', '.join(by_kind.values())}: {e}") from None
