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

    def from_encoder_frames(self, n_encoder_frames: int) -> int:
        """Rows for a clip whose (cached) encoder output has this many frames."""
        return int(adapter_frames(n_encoder_frames, self.adapter_stack))

    def __call__(self, n_frames: int) -> int:
        if self.whisper:
            enc = WhisperEncoder.output_lengths(n_frames)
        else:
            enc = conformer_frames(n_frames, self.encoder_stack)
        return int(adapter_frames(enc, self.adapter_stack))


def clip_features(wave: torch.Tensor, whisper: bool) -> torch.Tensor:
    """[frames, n_mels] features of a 16 kHz clip: Whisper's own log-mel for a Whisper encoder, ours otherwise."""
    from mm_llama.data.audio import log_mel

    from .whisper import whisper_log_mel

    return whisper_log_mel(wave).transpose(0, 1) if whisper else log_mel(wave)


def run_encoder(encoder: nn.Module, features_BFM: torch.Tensor, lengths: torch.Tensor):
    """Whisper or Conformer encoder on padded features [B, F, n_mels] -> (output [B, T, D_enc], lengths [B])."""
    if isinstance(encoder, WhisperEncoder):
        return encoder(features_BFM.transpose(1, 2), lengths)
    return encoder(features_BFM, lengths)


class CTCHead(nn.Module):
    """An auxiliary CTC loss on the adapter's output rows over the frozen tower's OWN token table (LegoSLM /
    Speech-LLaMA style): logit(row, token) = scale * cos(row, embedding[token]), plus one learned blank. It pulls
    each row towards the embedding of the token spoken there, which is what the frozen tower can already read;
    training only (generation never calls it)."""

    def __init__(self, dim: int, weight: float, negatives: int = 4096):
        super().__init__()
        self.weight, self.negatives = weight, negatives
        self.blank = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(10.0)))))
        self._keys: tuple | None = None  # ((data_ptr, version, device) of the frozen table, its rows unit-normalised)

    def _table_keys(self, table: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        tag = (table.data_ptr(), table._version, table.device)
        if self._keys is None or self._keys[0] != tag:
            with torch.no_grad():
                self._keys = (tag, F.normalize(table.float(), dim=-1))
        return self._keys[1]

    def loss_sum(self, table: torch.Tensor, rows: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Summed CTC negative log-likelihood (x weight) of each clip's target token ids given its rows. The softmax
        runs over the batch's own target tokens plus `negatives` tokens drawn at random from the table (sampled
        softmax: the full 49k-128k table costs more than the adapter itself), or the whole table (negatives=0)."""
        import torch.nn.functional as F

        keys = self._table_keys(table)
        V = keys.shape[0]
        flat = torch.cat(targets).to(keys.device)
        if 0 < self.negatives < V:
            cand = torch.unique(torch.cat([flat, torch.randint(V, (self.negatives,), device=keys.device)]))
            keys, flat = keys[cand], torch.searchsorted(cand, flat)
        keys = torch.cat([keys, F.normalize(self.blank.float(), dim=-1)[None]])
        n = torch.tensor([r.shape[0] for r in rows])
        x = torch.zeros(len(rows), int(n.max()), keys.shape[1], device=keys.device)
        for b, r in enumerate(rows):
            x[b, : r.shape[0]] = r.float()
        logits = self.log_scale.exp() * (F.normalize(x, dim=-1) @ keys.T)  # [B, T, C + 1]
        logp = logits.log_softmax(-1).transpose(0, 1)  # [T, B, C + 1]
        tl = torch.tensor([len(t) for t in targets])
        nll = F.ctc_loss(logp, flat, n, tl, blank=keys.shape[0] - 1, reduction="none", zero_infinity=True)
        return self.weight * nll.sum()

    @torch.no_grad()
    def greedy(self, table: torch.Tensor, rows: torch.Tensor) -> list[int]:
        """Best-path CTC decoding of one clip's rows over the whole table (repeats merged, blanks dropped)."""
        import torch.nn.functional as F

        keys = torch.cat([self._table_keys(table), F.normalize(self.blank.float(), dim=-1)[None]])
        ids = (F.normalize(rows.float(), dim=-1) @ keys.T).argmax(-1).tolist()
        blank = keys.shape[0] - 1
        return [t for i, t in enumerate(ids) if t != blank and (i == 0 or t != ids[i - 1])]


class FusedSpeechModel(nn.Module):
    def __init__(self, tower: Transformer, encoder: nn.Module, adapter: SpeechAdapter, *, freeze_encoder=False,
                 ctc_weight: float = 0.0):  # fmt: skip
        super().__init__()
        self.tower, self.encoder, self.adapter = tower, encoder, adapter
        self.ctc = CTCHead(tower.args.dim, ctc_weight) if ctc_weight > 0 else None
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
        return self.adapt(*self.run_encoder(features_BFM, lengths))

    def run_encoder(self, features_BFM: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (encoder output [B, T, D_enc], its lengths [B])."""
        return run_encoder(self.encoder, features_BFM, lengths)

    def adapt(self, h_BTD: torch.Tensor, enc_len: torch.Tensor) -> list[torch.Tensor]:
        """Encoder output (live or cached) -> per clip adapter rows [n_tokens, D]."""
        out, out_len = self.adapter(h_BTD, enc_len)
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
