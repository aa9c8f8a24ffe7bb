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
gives the composed ones.

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

from .fusion import TOKEN_ROWS, FusedVisionModel
from .speech_fusion import FusedSpeechModel
from .video import FusedVideoModel
from .xattn import media_attention_mask

MODALITIES = ("image", "video", "speech")


@dataclass
class ModelOutput:
    """What `ComposedModel.forward` returns: logits (all positions, or [N, V] at the selected/labelled ones), and with
    `labels=` the mean loss over labelled tokens, its sum and the number of labelled tokens."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_tokens: int = 0


def label_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: positions whose NEXT token is a label (where logits are needed)."""
    select = torch.zeros_like(labels_BT, dtype=torch.bool)
    select[:, :-1] = labels_BT[:, 1:] != -100
    return select


class ComposedModel(nn.Module):
    """tower + {image: FusedVisionModel, video: FusedVideoModel, speech: FusedSpeechModel} (any subset), all on
    ONE tower object. A video model brings its image model; an image model given beside it must be that one."""

    def __init__(
        self,
        tower: Transformer,
        *,
        image: FusedVisionModel | None = None,
        video: FusedVideoModel | None = None,
        speech: FusedSpeechModel | None = None,
        token_rows: dict[str, tuple[int, int, int]] | None = None,
    ):
        super().__init__()
        if video is not None:
            if image is not None and image is not video.image_model:
                raise ValueError("the video adapter was built on another image model than the one given")
            image = video.image_model
        parts = {"image": image, "video": video, "speech": speech}
        for kind, part in parts.items():
            if part is not None and part.tok_embeddings is not tower.tok_embeddings:
                raise ValueError(f"the {kind} adapter sits on another tower object; compose adapters on one tower")
        if image is not None and image.image_token_id != tower.args.vocab_size:
            raise ValueError(f"the image adapter's <|image|> id is {image.image_token_id}, composition needs "
                             f"{tower.args.vocab_size} (the first id after the tower's vocabulary)")  # fmt: skip
        self.tower = tower
        self.image, self.video, self.speech = image, video, speech
        rows = {k: tuple(v) for k, v in (token_rows or TOKEN_ROWS).items() if parts.get(k) is not None}
        spans = sorted((start, start + n, k) for k, (start, n, _) in rows.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"token rows of {a} and {b} overlap: {rows}")
        self.token_rows = rows
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
        return [k for k in MODALITIES if getattr(self, k) is not None]

    def token_id(self, kind: str) -> int:
        """The composed id of a modality's first token (`<|image|>`, `<|video|>`, `<|speech|>`)."""
        if kind not in self.token_rows:
            raise KeyError(f"no {kind} adapter in this model (it has: {', '.join(self.modalities) or 'none'})")
        return self.tower.args.vocab_size + self.token_rows[kind][0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen means frozen: the parts keep their own frozen pieces in eval mode
        for kind in self.modalities:
            getattr(self, kind).train(mode)
        return self

    def _row_table(self, kind: str) -> nn.Embedding:
        return self.speech.learnable_embedding if kind == "speech" else self.image.learnable_embedding

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings: the frozen table below V, each modality's learnable rows in its own id range."""
        V = self.tower.args.vocab_size
        h = self.tower.tok_embeddings(input_ids_BT.clamp(max=V - 1))
        for kind, (start, n, local) in self.token_rows.items():
            sel = (input_ids_BT >= V + start) & (input_ids_BT < V + start + n)
            if sel.any():
                table = self._row_table(kind)
                rows = table((input_ids_BT - V - start + local).clamp(0, table.num_embeddings - 1))
                h = torch.where(sel[..., None], rows.to(h.dtype), h)
        return h

    def splice_speech(self, h_BTD, input_ids_BT, speech: list[torch.Tensor | None]) -> torch.Tensor:
        """Speech adapter rows into the `<|speech|>` positions of each sample (None: a sample without audio)."""
        placeholder = self.token_id("speech")
        h_BTD = h_BTD.clone()
        for b, rows in enumerate(speech):
            where = (input_ids_BT[b] == placeholder).nonzero().squeeze(-1)
            n = 0 if rows is None else rows.shape[0]
            if len(where) != n:
                raise ValueError(f"sample {b}: {len(where)} <|speech|> placeholders but {n} speech rows "
                                 "(expand the placeholder with expected_speech_tokens)")  # fmt: skip
            if n:
                h_BTD[b, where] = rows.to(h_BTD.dtype)
        return h_BTD

    def encode_speech(self, features: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per sample features [frames, n_mels] or None -> adapter rows [n, D] or None (one batched encoder call)."""
        idx = [b for b, f in enumerate(features) if f is not None]
        out: list[torch.Tensor | None] = [None] * len(features)
        if not idx:
            return out
        dev = self.tower.tok_embeddings.weight.device
        lens = torch.tensor([features[b].shape[0] for b in idx], device=dev)
        batch = torch.zeros(len(idx), int(lens.max()), features[idx[0]].shape[1], device=dev)
        for i, b in enumerate(idx):
            batch[i, : features[b].shape[0]] = features[b]
        for b, rows in zip(idx, self.speech.encode_speech(batch, lens), strict=True):
            out[b] = rows
        return out

    def image_state(self, input_ids_BT, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask):
        """(per-block K/V, additive mask, row mask) of the images for these positions."""
        im = self.image
        media_kv = im.media_kv(im.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        T = input_ids_BT.shape[1]
        dtype = self.tower.tok_embeddings.weight.dtype
        bias, row = media_attention_mask(cross_attention_mask[:, -T:], im.vision_encoder.args.num_patches, dtype)
        return media_kv, bias, row

    def video_state(self, input_ids_BT, videos: list[torch.Tensor | None]):
        """(per-block K/V, additive mask, row mask) of the videos: text sees a sample's video from its <|video|> on."""
        tokens = [None if v is None else self.video.encode_video(v) for v in videos]
        if all(t is None for t in tokens):
            return None
        return self.video.video_inputs(tokens, input_ids_BT, token_id=self.token_id("video"))

    def blocks(self, image_state=None, video_state=None) -> dict[int, list]:
        """The cross-attention blocks to inject into the tower's layer loop for these media (video blocks first)."""
        inject: dict[int, list] = {}
        for part, state in ((self.video, video_state), (self.image, image_state)):
            if state is not None:
                fns = part.blocks(state) if part is self.video else part.blocks(*state)
                for layer, f in fns.items():
                    inject.setdefault(layer, []).extend(f)
        return inject

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        videos: list[torch.Tensor | None] | None = None,
        speech_features: list[torch.Tensor | None] | None = None,
        labels: torch.Tensor | None = None,
        image_state=None,
        video_state=None,
        speech: list[torch.Tensor | None] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] with composed token ids. Media (any may be absent):
        images as transformers' Mllama (pixel_values [B, I, N, C, H, W], aspect_ratio_ids/mask [B, I(, N)],
        cross_attention_mask [B, T, I, N]; samples without images have all-zero mask rows);
        videos: per sample frames [F, C, H, W] or None; speech_features: per sample [frames, n_mels] or None.
        Precomputed forms for generation: image_state / video_state (see the methods of those names; rows for
        exactly these positions), speech (adapter rows per sample, at prefill).
        labels [B, T] (-100 ignored): logits only where the next token is a label, plus the loss."""
        if pixel_values is not None and image_state is None:
            if self.image is None:
                raise ValueError("images were given, but no image adapter is loaded")
            if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
                raise ValueError("pixel_values need aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask")
            image_state = self.image_state(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                           cross_attention_mask)  # fmt: skip
        if videos is not None and video_state is None:
            if self.video is None:
                raise ValueError("videos were given, but no video adapter is loaded")
            video_state = self.video_state(input_ids, videos)
        if speech_features is not None and speech is None:
            if self.speech is None:
                raise ValueError("speech features were given, but no speech adapter is loaded")
            speech = self.encode_speech(speech_features)
        h = self.embed(input_ids)
        if speech is not None and "speech" in self.token_rows:
            h = self.splice_speech(h, input_ids, speech)
        if labels is not None and select is None:
            select = label_positions(labels)
        logits = self.tower(embeds=h, positions=positions, mask=mask, cache=cache, last_only=last_only,
                            select=select, inject=self.blocks(image_state, video_state))  # fmt: skip
        if labels is None:
            return ModelOutput(logits)
        targets = labels[:, 1:][select[:, :-1]]  # row-major, as logits[select]
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        n = int(targets.numel())
        return ModelOutput(logits, loss_sum / max(n, 1), loss_sum, n)


# --- adapter files of any kind, in any order, onto one tower ----------------------------------------------
ADAPTER_FORMATS = {
    "mm_llama.image_adapter.v1": "image",
    "mm_llama.video_adapter.v1": "video",
    "mm_llama.speech_adapter.v1": "speech",
}


def adapter_kind(path) -> str:
    """image | video | speech, read from the adapter file's metadata."""
    from mm_llama.llama.checkpoint import CheckpointError

    from .checkpoint import read_adapter_meta

    fmt = read_adapter_meta(path).get("format")
    if fmt not in ADAPTER_FORMATS:
        raise CheckpointError(f"{path}: unknown adapter format {fmt!r} (known: {', '.join(ADAPTER_FORMATS)})")
    return ADAPTER_FORMATS[fmt]


def load_composed(tower: Transformer, paths) -> ComposedModel:
    """Load adapter files of any kind (read from each file) onto `tower`: at most one per kind; a video adapter
    needs its image adapter among them. Token rows come from the files (files written before they were saved
    get the default layout)."""
    from mm_llama.llama.checkpoint import CheckpointError

    from .asr import load_speech_adapter
    from .checkpoint import load_adapter, read_adapter_meta
    from .video import load_video_adapter

    by_kind: dict[str, str] = {}
    rows = dict(TOKEN_ROWS)
    for p in paths:
        kind = adapter_kind(p)
        if kind in by_kind:
            raise CheckpointError(f"two {kind} adapters given: {by_kind[kind]} and {p} (one per kind)")
        by_kind[kind] = str(p)
        rows.update({k: tuple(v) for k, v in read_adapter_meta(p).get("token_rows", {}).items()})
    if "video" in by_kind and "image" not in by_kind:
        raise CheckpointError(f"{by_kind['video']}: a video adapter runs on its image adapter: pass that one too")
    image = load_adapter(tower, by_kind["image"]) if "image" in by_kind else None
    video = load_video_adapter(image, by_kind["video"]) if "video" in by_kind else None
    speech = load_speech_adapter(tower, by_kind["speech"]) if "speech" in by_kind else None
    try:
        return ComposedModel(tower, image=image, video=video, speech=speech, token_rows=rows).eval()
    except ValueError as e:
        raise CheckpointError(f"{', '.join(by_kind.values())}: {e}") from None
