"""Speech: an encoder (the paper's Conformer, or a pretrained Whisper encoder) + the speech adapter, whose output
rows replace `<|speech|>` placeholders in the input sequence (one per 80 ms)."""

from __future__ import annotations

from dataclasses import dataclass

from mm_llama.assets import resolve
from mm_llama.config import ConfigError, choice
from mm_llama.data.audio import AUDIO_EXTS

from ..fusion import TOKEN_ROWS
from ..modality import AnswerOptions, Modality, require_member, text_target
from ..speech import ADAPTER_PRESETS, CONFORMER_PRESETS

MIN_SECONDS = 0.1  # shorter clips give the encoder and adapter (almost) no frames: a clear error instead
CHUNK_SECONDS = 30.0  # Whisper's window; longer clips are transcribed in pieces of at most this length


def chunks(wave, seconds: float = CHUNK_SECONDS) -> list:
    """A 16 kHz clip in consecutive pieces of at most `seconds` (the last one at least MIN_SECONDS long)."""
    n = int(seconds * 16000)
    pieces = list(wave.split(n))
    if len(pieces) > 1 and pieces[-1].numel() < MIN_SECONDS * 16000:
        pieces[-2:] = [wave[-(pieces[-2].numel() + pieces[-1].numel()) :]]
    return pieces


@dataclass
class SpeechConfig:
    encoder: str = "conformer:debug"  # conformer:PRESET | whisper:PATH
    adapter: str = choice("debug", *ADAPTER_PRESETS)  # speech adapter preset (adapters/speech.py)
    freeze_encoder: bool = False

    def __post_init__(self):
        kind, _, arg = self.encoder.partition(":")
        if kind == "conformer" and arg in CONFORMER_PRESETS or kind == "whisper" and arg:
            return
        presets = ", ".join(f"conformer:{k}" for k in CONFORMER_PRESETS)
        raise ConfigError(f"model.speech.encoder: {self.encoder!r} is not allowed; use {presets} or whisper:PATH")


class SpeechSamples:
    """raw sample -> prompt `[BOS] Repeat after me in English: <|speech|> x n` + transcript, and the features."""

    def __init__(self, count, whisper: bool, token_id: int, tok, max_text_tokens: int):
        self.count, self.whisper, self.token_id, self.tok, self.max_text = (
            count,
            whisper,
            token_id,
            tok,
            max_text_tokens,
        )

    def __call__(self, raw: dict) -> dict:
        from mm_llama.data.audio import decode_audio, log_mel
        from mm_llama.data.collate import build_example
        from mm_llama.generate import bos_prefix

        from ..speech_fusion import ASR_PROMPT
        from ..whisper import whisper_log_mel

        target = text_target(self.tok, raw, self.max_text)
        ext = require_member(raw, AUDIO_EXTS, "audio")
        wave = decode_audio(raw[ext], raw["__key__"], ext, min_seconds=MIN_SECONDS,
                            max_seconds=CHUNK_SECONDS if self.whisper else None)  # fmt: skip
        feats = whisper_log_mel(wave).transpose(0, 1) if self.whisper else log_mel(wave)
        n = self.count(feats.shape[0])
        prompt = bos_prefix(self.tok) + self.tok.encode(ASR_PROMPT.format(language="English")) + [self.token_id] * n
        return {**build_example(prompt, target), "speech": feats}


class Speech(Modality):
    name = "speech"
    exts = AUDIO_EXTS
    what = "transcript"
    format = "mm_llama.speech_adapter.v1"
    token_rows = TOKEN_ROWS["speech"]
    inputs = ("speech_features", "speech")
    Config = SpeechConfig

    def build(self, tower, cfg, parts):
        from ..asr import build_speech_model
        from ..speech import ConformerEncoder
        from ..whisper import load_whisper_encoder

        c = cfg.speech
        kind, _, arg = c.encoder.partition(":")
        enc = ConformerEncoder(CONFORMER_PRESETS[arg]) if kind == "conformer" else load_whisper_encoder(resolve(arg))
        return build_speech_model(tower, enc, ADAPTER_PRESETS[c.adapter], freeze_encoder=c.freeze_encoder)

    def save(self, part, path):
        from ..asr import save_speech_adapter

        save_speech_adapter(part, path)

    def load(self, tower, path, parts):
        from ..asr import load_speech_adapter

        return load_speech_adapter(tower, path)

    def row_table(self, part):
        return part.learnable_embedding

    def prepare(self, model, input_ids, inputs):
        if inputs.get("speech") is not None:
            return inputs["speech"]
        feats = inputs.get("speech_features")
        if feats is None or all(f is None for f in feats):
            return None
        return encode_speech(model, feats)

    def input_rows(self, model, h_BTD, input_ids, state):
        """Adapter rows into the `<|speech|>` positions of each sample (None: a sample without audio)."""
        placeholder = model.token_id("speech")
        h_BTD = h_BTD.clone()
        for b, rows in enumerate(state):
            where = (input_ids[b] == placeholder).nonzero().squeeze(-1)
            n = 0 if rows is None else rows.shape[0]
            if len(where) != n:
                raise ValueError(f"sample {b}: {len(where)} <|speech|> placeholders but {n} speech rows "
                                 "(expand the placeholder with expected_speech_tokens)")  # fmt: skip
            if n:
                h_BTD[b, where] = rows.to(h_BTD.dtype)
        return h_BTD

    def sample_maker(self, model, tok, cfg):
        from ..speech_fusion import SpeechTokenCount

        count = SpeechTokenCount.of(model.speech)
        return SpeechSamples(count, count.whisper, model.token_id("speech"), tok, cfg.data.max_text_tokens)

    def collate(self, items):
        return {"speech_features": [it["speech"] for it in items]}

    def answer(self, model, tok, name, data, opts: AnswerOptions):
        from mm_llama.data.audio import decode_audio

        from ..asr import transcribe

        wave = decode_audio(data, name, name.rsplit(".", 1)[-1].lower(), min_seconds=MIN_SECONDS)
        texts = transcribe(model.speech, tok, chunks(wave), language=opts.language, max_new_tokens=opts.max_new_tokens,
                           temperature=opts.temperature, on_token=opts.on_token)  # fmt: skip
        return " ".join(t.strip() for t in texts if t.strip()), wave.numel() / 16000

    def hypotheses(self, model, tok, samples, opts):
        from mm_llama.data.audio import decode_audio

        from ..asr import transcribe

        waves = []
        for s in samples:
            ext = require_member(s, AUDIO_EXTS, "audio")
            waves.append(decode_audio(s[ext], s["__key__"], ext, min_seconds=MIN_SECONDS))
        return transcribe(model.speech, tok, waves, language=opts.language, max_new_tokens=opts.max_new_tokens)

    def metrics(self, references, hypotheses):
        from ..asr import wer_cer

        return wer_cer(references, hypotheses)


def encode_speech(model, features: list) -> list:
    """Per sample features [frames, n_mels] or None -> adapter rows [n, D] or None (one batched encoder call)."""
    import torch

    idx = [b for b, f in enumerate(features) if f is not None]
    out = [None] * len(features)
    dev = model.tower.tok_embeddings.weight.device
    lens = torch.tensor([features[b].shape[0] for b in idx], device=dev)
    batch = torch.zeros(len(idx), int(lens.max()), features[idx[0]].shape[1], device=dev)
    for i, b in enumerate(idx):
        batch[i, : features[b].shape[0]] = features[b]
    for b, rows in zip(idx, model.speech.encode_speech(batch, lens), strict=True):
        out[b] = rows
    return out


SPEC = Speech()
