"""Splicing speech into the frozen tower: adapter outputs replace placeholder tokens, one per output frame.

A prompt is built as  [BOS] "Repeat after me in English:" <|speech|> x n  transcript  where n is exactly the
adapter's output length for that clip (`expected_speech_tokens`). Labels are masked on prompt and speech positions
(`data.collate.build_example`). The tower stays frozen and in eval mode; trainable: encoder (unless frozen),
adapter and the extra embedding rows.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.llama.model import Transformer

from .fusion import NUM_EXTRA_TOKENS, embed_with_extra_rows, init_extra_rows
from .speech import SpeechAdapter, adapter_frames, conformer_frames
from .whisper import WhisperEncoder

ASR_PROMPT = "Repeat after me in {language}:"


class SpeechTokenCount:
    """Clip frames -> number of `<|speech|>` rows the encoder + adapter produce; picklable (holds args, no
    modules), so data workers can expand placeholders without the model."""

    def __init__(self, whisper: bool, encoder_stack: int, adapter_stack: int):
        self.whisper, self.encoder_stack, self.adapter_stack = whisper, encoder_stack, adapter_stack

    @classmethod
    def of(cls, model: FusedSpeechModel) -> SpeechTokenCount:
        whisper = isinstance(model.encoder, WhisperEncoder)
        return cls(whisper, 1 if whisper else model.encoder.args.stack, model.adapter.args.stack)

    def __call__(self, n_frames: int) -> int:
        if self.whisper:
            enc = WhisperEncoder.output_lengths(n_frames)
        else:
            enc = conformer_frames(n_frames, self.encoder_stack)
        return int(adapter_frames(enc, self.adapter_stack))


class FusedSpeechModel(nn.Module):
    def __init__(self, tower: Transformer, encoder: nn.Module, adapter: SpeechAdapter, *, freeze_encoder=False):
        super().__init__()
        self.tower, self.encoder, self.adapter = tower, encoder, adapter
        self.learnable_embedding = nn.Embedding(NUM_EXTRA_TOKENS, tower.args.dim)
        init_extra_rows(self.learnable_embedding, tower)
        self.placeholder_id = tower.args.vocab_size  # the first extra row: <|speech|>
        self.freeze_encoder = freeze_encoder
        self.tower.requires_grad_(False)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.train(False)

    @property
    def args(self):
        return self.tower.args

    @property
    def tok_embeddings(self):
        return self.tower.tok_embeddings

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def expected_speech_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        lengths = enc.output_lengths(feature_lengths)
        return self.adapter.output_lengths(lengths)

    def encode_speech(self, features_BFM: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per clip [n_tokens, D] embeddings (features: log-mel [B, F, n_mels]; Whisper's own features for Whisper)."""
        if isinstance(self.encoder, WhisperEncoder):
            h, enc_len = self.encoder(features_BFM.transpose(1, 2), lengths)
        else:
            h, enc_len = self.encoder(features_BFM, lengths)
        out, out_len = self.adapter(h, enc_len)
        return [out[b, : int(n)] for b, n in enumerate(out_len)]

    def embed(self, input_ids_BT: torch.Tensor, speech: list[torch.Tensor] | None) -> torch.Tensor:
        h = embed_with_extra_rows(self.tower, self.learnable_embedding, input_ids_BT)
        if speech is not None:
            h = h.clone()
            for b, emb in enumerate(speech):
                where = (input_ids_BT[b] == self.placeholder_id).nonzero().squeeze(-1)
                if len(where) != emb.shape[0]:
                    raise ValueError(
                        f"sample {b}: {len(where)} speech placeholder tokens but the adapter produced {emb.shape[0]} "
                        "frames (expand the placeholder with expected_speech_tokens)"
                    )
                h[b, where] = emb.to(h.dtype)
        return h

    def forward(self, input_ids, features=None, feature_lengths=None, *, speech=None, positions=None, mask=None,
                cache=None, last_only=False, select=None):  # fmt: skip
        """Logits [B, T, V]. features/feature_lengths: one clip per sample (length 0: no audio);
        speech: precomputed `encode_speech` output (generation encodes once, then splices at prefill only)."""
        if speech is None and features is not None:
            speech = self.encode_speech(features, feature_lengths)
        h = self.embed(input_ids, speech)
        return self.tower(embeds=h, positions=positions, mask=mask, cache=cache, last_only=last_only, select=select)
