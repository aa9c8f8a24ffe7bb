"""Speech: an encoder (the paper's Conformer, or a pretrained Whisper encoder) + the speech adapter, whose output
rows replace `<|speech|>` placeholders in the input sequence (one per 80 ms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_llama.assets import resolve
from mm_llama.config import ConfigError, bounded, choice
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
    ctc_weight: float = bounded(0.0, lo=0.0)  # auxiliary CTC loss over the tower's token table (0: off)

    def __post_init__(self):
        kind, _, arg = self.encoder.partition(":")
        if kind == "conformer" and arg in CONFORMER_PRESETS or kind == "whisper" and arg:
            return
        presets = ", ".join(f"conformer:{k}" for k in CONFORMER_PRESETS)
        raise ConfigError(f"model.speech.encoder: {self.encoder!r} is not allowed; use {presets} or whisper:PATH")


CACHE_MEMBER, CACHE_ID_MEMBER = "enc.npy", "enc.txt"  # cached frozen-encoder output [T, D] (float16) and its encoder


class SpeechSamples:
    """raw sample -> prompt `[BOS] Repeat after me in English: <|speech|> x n` + transcript, and the features
    (or, for a frozen encoder whose outputs are cached in the shard, `enc.npy` written by this encoder, those)."""

    def __init__(self, count, whisper: bool, token_id: int, tok, max_text_tokens: int, cached_encoder: str = ""):
        self.count, self.whisper, self.token_id, self.tok, self.max_text = (
            count,
            whisper,
            token_id,
            tok,
            max_text_tokens,
        )
        self.cached_encoder = cached_encoder

    def _prompt(self, n: int) -> list[int]:
        from mm_llama.generate import bos_prefix

        from ..speech_fusion import ASR_PROMPT

        return bos_prefix(self.tok) + self.tok.encode(ASR_PROMPT.format(language="English")) + [self.token_id] * n

    def __call__(self, raw: dict) -> dict:
        from mm_llama.data.audio import decode_audio
        from mm_llama.data.collate import build_example

        from ..speech_fusion import clip_features

        target = text_target(self.tok, raw, self.max_text)
        if self.cached_encoder and raw.get(CACHE_ID_MEMBER, b"").decode(errors="replace") == self.cached_encoder:
            enc = read_cached(raw)
            return {**build_example(self._prompt(self.count.from_encoder_frames(enc.shape[0])), target),
                    "speech_enc": enc}  # fmt: skip
        ext = require_member(raw, AUDIO_EXTS, "audio")
        wave = decode_audio(raw[ext], raw["__key__"], ext, min_seconds=MIN_SECONDS,
                            max_seconds=CHUNK_SECONDS if self.whisper else None)  # fmt: skip
        feats = clip_features(wave, self.whisper)
        return {**build_example(self._prompt(self.count(feats.shape[0])), target), "speech": feats}


def read_cached(raw: dict):
    import io

    import numpy as np
    import torch

    from mm_llama.data.badsamples import SampleError

    try:
        arr = np.load(io.BytesIO(raw[CACHE_MEMBER]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError("bad_cache", f"{raw.get('__shard__')}:{raw.get('__key__')}: {CACHE_MEMBER}: {e}") from None
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise SampleError("bad_cache", f"{raw.get('__shard__')}:{raw.get('__key__')}: {CACHE_MEMBER} has shape "
                          f"{arr.shape}, expected [frames, width]")  # fmt: skip
    return torch.from_numpy(arr.astype(np.float32))


class Speech(Modality):
    name = "speech"
    exts = AUDIO_EXTS
    what = "transcript"
    format = "mm_llama.speech_adapter.v1"
    token_rows = TOKEN_ROWS["speech"]
    inputs = ("speech_features", "speech_encoded", "speech")
    Config = SpeechConfig

    def build(self, tower, cfg, parts):
        from ..asr import build_speech_model

        c = cfg.speech
        enc = load_encoder(c.encoder)
        return build_speech_model(tower, enc, ADAPTER_PRESETS[c.adapter], freeze_encoder=c.freeze_encoder,
                                  ctc_weight=c.ctc_weight)  # fmt: skip

    def save(self, part, path):
        from ..asr import save_speech_adapter

        save_speech_adapter(part, path)

    def load(self, tower, path, parts):
        from ..asr import load_speech_adapter

        return load_speech_adapter(tower, path)

    def row_table(self, part):
        return part.learnable_embedding

    def shard_units(self, part):
        return list(part.encoder.layers)

    plan_audio_seconds = 30.0  # the memory plan's clip: Whisper's window, the longest the data path takes

    def plan_pieces(self, part, batch, seq_len, dtype, cfg):
        from ..plan import Piece, PlanPieces

        meta = {"device": "meta"}
        frames = int(self.plan_audio_seconds * 100) + 1  # 10 ms hop
        n_mels = getattr(part.encoder.args, "n_mels", 80)
        feats = torch.empty(batch, frames, n_mels, dtype=dtype, **meta)
        lens = torch.full((batch,), frames, dtype=torch.long, **meta)
        h, h_len = part.run_encoder(feats, lens)
        out, _ = part.adapter(h, h_len)  # [B, rows, D]: spliced into each sequence
        pieces = [Piece("speech encoder", lambda: part.run_encoder(feats, lens), units=tuple(part.encoder.layers)),
                  Piece("speech adapter", lambda: part.adapter(h, h_len), shared=(h,))]  # fmt: skip
        from ..plan import tensor_bytes

        shared = tensor_bytes(h) if any(p.requires_grad for p in part.adapter.parameters()) else 0
        lowest = 0  # the spliced rows need gradients through every tower layer
        return PlanPieces(pieces, shared_bytes=shared, extra_rows=out.shape[1], lowest_layer=lowest)

    def prepare(self, model, input_ids, inputs):
        if inputs.get("speech") is not None:
            return inputs["speech"]
        feats, enc = inputs.get("speech_features"), inputs.get("speech_encoded")
        if all(x is None or all(f is None for f in x) for x in (feats, enc)):
            return None
        return encode_speech(model, feats, enc)

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

    def aux_loss(self, model, state, input_ids, labels):
        """The CTC loss of the adapter rows against each sample's transcript (its labelled ids, end of text
        dropped), when the part has a CTC head and labels are given."""
        part = model.speech
        if part.ctc is None or labels is None or not part.training:
            return None
        rows, targets = [], []
        for b, r in enumerate(state):
            if r is None:
                continue
            t = labels[b][labels[b] >= 0]  # the transcript's ids, then its end-of-text id (text_target)
            rows.append(r)
            targets.append(t[:-1])
        if not rows:
            return None
        return part.ctc.loss_sum(model.tower.tok_embeddings.weight, rows, targets)

    def sample_maker(self, model, tok, cfg):
        from ..speech_fusion import SpeechTokenCount

        count = SpeechTokenCount.of(model.speech)
        c = cfg.model.speech
        return SpeechSamples(count, count.whisper, model.token_id("speech"), tok, cfg.data.max_text_tokens,
                             cached_encoder=c.encoder if c.freeze_encoder else "")  # fmt: skip

    def collate(self, items):
        return {"speech_features": [it.get("speech") for it in items],
                "speech_encoded": [it.get("speech_enc") for it in items]}  # fmt: skip

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


def _pad(xs: list, dev):
    import torch

    lens = torch.tensor([x.shape[0] for x in xs], device=dev)
    batch = torch.zeros(len(xs), int(lens.max()), xs[0].shape[1], device=dev)
    for i, x in enumerate(xs):
        batch[i, : x.shape[0]] = x
    return batch, lens


def encode_speech(model, features: list | None, encoded: list | None = None) -> list:
    """Per sample features [frames, n_mels], or cached encoder output [T, D_enc], or None -> adapter rows [n, D] or
    None (one batched encoder call for the live ones, one adapter call for all)."""

    n = len(features if features is not None else encoded)
    features, encoded = features or [None] * n, encoded or [None] * n
    dev = model.tower.tok_embeddings.weight.device
    live = [b for b in range(n) if features[b] is not None and encoded[b] is None]
    hs: dict[int, torch.Tensor] = {b: encoded[b].to(dev) for b in range(n) if encoded[b] is not None}
    if live:
        h, lens = model.speech.run_encoder(*_pad([features[b] for b in live], dev))
        hs.update({b: h[i, : int(lens[i])] for i, b in enumerate(live)})
    out = [None] * n
    if hs:
        order = sorted(hs)
        batch, lens = _pad([hs[b] for b in order], dev)
        for b, rows in zip(order, model.speech.adapt(batch, lens), strict=True):
            out[b] = rows
    return out


def load_encoder(spec: str):
    """`model.speech.encoder` -> the encoder module: `whisper:PATH` (pretrained) or `conformer:PRESET` (fresh)."""
    from ..speech import ConformerEncoder
    from ..whisper import load_whisper_encoder

    kind, _, arg = spec.partition(":")
    if kind == "whisper" and arg:
        return load_whisper_encoder(resolve(arg))
    if kind == "conformer" and arg in CONFORMER_PRESETS:
        return ConformerEncoder(CONFORMER_PRESETS[arg])
    raise ConfigError(f"encoder {spec!r}: use whisper:PATH or conformer:PRESET")


def cache_encoder_outputs(encoder, encoder_id: str, index, out_dir, *, batch: int = 32, replace: bool = False):
    """Copy speech shards with each clip's frozen-encoder output added (`enc.npy`, float16 [T, D], and `enc.txt`
    = `encoder_id`, the config's `model.speech.encoder`): training a frozen-encoder adapter on the copy runs the
    encoder once per clip instead of once per step (`mm-llama shards encode`). Clips that do not decode are copied
    unchanged (the loader counts and skips them, as without a cache)."""
    import io

    import numpy as np
    import torch

    from mm_llama.data.audio import decode_audio
    from mm_llama.data.shards import derive_shards

    from ..speech_fusion import clip_features, run_encoder
    from ..whisper import WhisperEncoder

    encoder = encoder.eval()
    whisper = isinstance(encoder, WhisperEncoder)
    dev = next(encoder.parameters()).device

    def add(samples):
        feats, where = [], []
        for i, s in enumerate(samples):
            ext = next((e for e in AUDIO_EXTS if e in s), None)
            try:
                wave = decode_audio(s[ext], s["__key__"], ext, min_seconds=MIN_SECONDS, max_seconds=CHUNK_SECONDS)
            except Exception:  # noqa: BLE001 - left for the loader to count and skip, as without a cache
                continue
            feats.append(clip_features(wave, whisper))
            where.append(i)
        extra = [{} for _ in samples]
        if feats:
            with torch.inference_mode():
                h, lens = run_encoder(encoder, *_pad(feats, dev))
            for j, i in enumerate(where):
                buf = io.BytesIO()
                np.save(buf, h[j, : int(lens[j])].float().cpu().numpy().astype(np.float16), allow_pickle=False)
                extra[i] = {CACHE_MEMBER: buf.getvalue(), CACHE_ID_MEMBER: encoder_id.encode()}
        return extra

    return derive_shards(index, out_dir, add, batch=batch, prefix="cached", replace=replace)


SPEC = Speech()
