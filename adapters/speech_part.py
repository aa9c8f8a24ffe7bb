"""The speech part: an encoder (the paper's Conformer, or a pretrained Whisper encoder), the speech adapter and a
learnable `<|speech|>` row; the adapter's output rows replace `<|speech|>` placeholders in the input, one per output
frame (adapters/modalities/speech.py splices them).

A prompt is built as  [BOS] "Repeat after me in English:" <|speech|> x n  transcript  where n is exactly the
adapter's output length for that clip (`SpeechTokenCount`). Trainable: encoder (unless frozen), adapter, the token
rows and, with `ctc_weight` > 0, a CTC head over the tower's own token table (training only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.data.audio import log_mel
from mm_llama.llama.config import ModelArgs

from .image import NUM_EXTRA_TOKENS, init_token_rows
from .speech import SpeechAdapter, adapter_frames, conformer_frames
from .whisper import WhisperEncoder, whisper_log_mel

ASR_PROMPT = "Repeat after me in {language}:"
INPUTS = ("rows", "ctc_posterior")


class SpeechTokenCount:
    """Clip frames -> number of `<|speech|>` rows the encoder + adapter produce; picklable (holds args, no
    modules), so data workers can expand placeholders without the model."""

    def __init__(self, whisper: bool, encoder_stack: int, adapter_stack: int):
        self.whisper, self.encoder_stack, self.adapter_stack = whisper, encoder_stack, adapter_stack

    @classmethod
    def of(cls, part: SpeechPart) -> SpeechTokenCount:
        whisper = isinstance(part.encoder, WhisperEncoder)
        return cls(whisper, 1 if whisper else part.encoder.args.stack, part.adapter.args.stack)

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
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        # ((data_ptr, version, device) of the frozen table, its rows unit-normalised, the table in fp32)
        self._keys: tuple | None = None

    def _cached(self, table: torch.Tensor) -> tuple:
        tag = (table.data_ptr(), table._version, table.device)
        if self._keys is None or self._keys[0] != tag:
            with torch.no_grad():
                whole = table.float()  # the table itself when it is fp32; one copy of a bf16 table, not one per call
                self._keys = (tag, F.normalize(whole, dim=-1), whole)
        return self._keys

    def _table_keys(self, table: torch.Tensor) -> torch.Tensor:
        return self._cached(table)[1]

    def _keys_and_blank(self, table: torch.Tensor) -> torch.Tensor:
        """The unit-normalised table rows, then the blank's key: [V + 1, D] (the blank is the last class)."""
        return torch.cat([self._table_keys(table), F.normalize(self.blank.float(), dim=-1)[None]])

    def loss_sum(self, table: torch.Tensor, rows: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Summed CTC negative log-likelihood (x weight) of each clip's target token ids given its rows. The softmax
        runs over the batch's own target tokens plus `negatives` tokens drawn at random from the table (sampled
        softmax: the full 49k-128k table costs more than the adapter itself), or the whole table (negatives=0)."""

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

    def posterior_inputs(self, table: torch.Tensor, rows: torch.Tensor, blank_input: torch.Tensor) -> torch.Tensor:
        """LegoSLM-style tower inputs: each row's CTC posterior over the whole table (and the blank) weighting the
        tower's own token embeddings (and `blank_input`): [n, D] rows -> [n, D] mixtures of what the tower reads."""
        keys = self._keys_and_blank(table)
        p = (self.log_scale.exp() * (F.normalize(rows.float(), dim=-1) @ keys.T)).softmax(-1)
        return p[:, :-1] @ self._cached(table)[2] + p[:, -1:] * blank_input.float()[None]

    @torch.no_grad()
    def greedy(self, table: torch.Tensor, rows: torch.Tensor) -> list[int]:
        """Best-path CTC decoding of one clip's rows over the whole table (repeats merged, blanks dropped)."""

        keys = self._keys_and_blank(table)
        ids = (F.normalize(rows.float(), dim=-1) @ keys.T).argmax(-1).tolist()
        blank = keys.shape[0] - 1
        return [t for i, t in enumerate(ids) if t != blank and (i == 0 or t != ids[i - 1])]


class SpeechPart(nn.Module):
    def __init__(
        self,
        tower_args: ModelArgs,
        encoder: nn.Module,
        adapter: SpeechAdapter,
        *,
        freeze_encoder: bool = False,
        ctc_weight: float = 0.0,
        piece_seconds: float = 30.0,
        inputs: str = "rows",
    ):
        super().__init__()
        self.tower_args = tower_args
        self.piece_seconds = piece_seconds  # longer recordings are answered in pieces of at most this, cut in pauses
        self.encoder, self.adapter = encoder, adapter
        self.ctc = CTCHead(tower_args.dim, ctc_weight) if ctc_weight > 0 else None
        # what the tower reads at the <|speech|> positions: the adapter's rows as they are ("rows"), or their CTC
        # posteriors over the tower's token table weighting its token embeddings ("ctc_posterior", LegoSLM)
        if inputs not in INPUTS:
            raise ValueError(f"speech inputs {inputs!r}: use one of {INPUTS}")
        if inputs == "ctc_posterior" and self.ctc is None:
            raise ValueError("speech inputs 'ctc_posterior' read the CTC head's posteriors: set ctc_weight > 0")
        self.inputs = inputs
        # the input a blank-dominated row stands for (ctc_posterior only; set from the table by build_speech_part)
        self.blank_input = nn.Parameter(torch.zeros(tower_args.dim)) if inputs == "ctc_posterior" else None
        self.learnable_embedding = nn.Embedding(NUM_EXTRA_TOKENS, tower_args.dim)  # row 0: <|speech|>
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @property
    def whisper(self) -> bool:
        return isinstance(self.encoder, WhisperEncoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def output_rows(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Adapter output rows for clips of these feature lengths."""
        return self.adapter.output_lengths(self.encoder.output_lengths(feature_lengths))

    def run_encoder(self, features_BFM: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (encoder output [B, T, D_enc], its lengths [B])."""
        return run_encoder(self.encoder, features_BFM, lengths)

    def adapt(self, h_BTD: torch.Tensor, enc_len: torch.Tensor) -> list[torch.Tensor]:
        """Encoder output (live or cached) -> per clip adapter rows [n_rows, D]."""
        out, out_len = self.adapter(h_BTD, enc_len)
        return [out[b, : int(n)] for b, n in enumerate(out_len)]

    def fresh_keys(self) -> set[str]:
        """Weights that an adapter file of the "rows" kind lacks and this part may start without (`init_adapter`
        from a CTC phase trained with rows)."""
        return {"blank_input"} if self.blank_input is not None else set()

    def tower_inputs(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One clip's adapter rows [n, D] -> what the tower reads at its n `<|speech|>` positions."""
        if self.blank_input is None or self.ctc is None:
            return rows
        return self.ctc.posterior_inputs(table, rows, self.blank_input)

    def encode(self, features_BFM: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per clip [n_rows, D] (features: log-mel [B, F, n_mels]; Whisper's own features for Whisper)."""
        return self.adapt(*self.run_encoder(features_BFM, lengths))


def build_speech_part(tower, encoder: nn.Module, adapter_args, **kw) -> SpeechPart:
    """A fresh speech part for `tower`: its outputs and token rows start at the scale of the tower's token table."""
    table = tower.tok_embeddings.weight
    adapter = SpeechAdapter(encoder.args.width, tower.args.dim, adapter_args)
    if not table.is_meta:  # the meta device: the memory plan's model (shapes only)
        adapter.init_output_scale(float(table.detach().float().std()))
    part = SpeechPart(tower.args, encoder, adapter, **kw)
    init_token_rows(part.learnable_embedding, table)
    if part.blank_input is not None and not table.is_meta:  # a blank row starts as the average token
        with torch.no_grad():
            part.blank_input.copy_(table.detach().float().mean(0))
    return part
