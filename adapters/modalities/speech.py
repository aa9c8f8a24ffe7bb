"""Speech: an encoder (the paper's Conformer, or a pretrained Whisper encoder) + the speech adapter, whose output
rows replace `<|speech|>` placeholders in the input sequence (one per 80 ms).

A sample is laid out `[BOS] Repeat after me in English: <|speech|> x n` + transcript, n = the adapter's rows for the
clip. Answers are one line (decoding stops at a token that begins a new line; the tower otherwise runs on past the
sentence) and a runaway loop at the end keeps one copy of its phrase (mm_llama.text.collapse_loop). Audio longer
than Whisper's 30 s window is answered in pieces that are joined.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
import torch

from mm_llama.assets import resolve
from mm_llama.config import ConfigError, bounded, choice
from mm_llama.data.badsamples import SampleError
from mm_llama.data.collate import build_example
from mm_llama.data.media import AUDIO
from mm_llama.data.writer import derive_shards
from mm_llama.generate import bos_prefix
from mm_llama.text import collapse_loop, first_line, wer_cer

from ..modality import DataHooks, EvalHooks, InferenceHooks, Modality, PartHooks, ScaleHooks, decode_member, text_target
from ..plan import Piece, PlanPieces, tensor_bytes
from ..speech import ADAPTER_PRESETS, CONFORMER_PRESETS, AdapterArgs, ConformerArgs, ConformerEncoder, SpeechAdapter
from ..speech_part import SpeechPart, SpeechTokenCount, build_speech_part, clip_features, run_encoder
from ..whisper import WhisperArgs, WhisperEncoder, load_whisper_encoder

ASR_PROMPT = "Repeat after me in {language}:"
MIN_SECONDS = 0.1  # shorter clips give the encoder and adapter (almost) no frames: a clear error instead
CHUNK_SECONDS = 30.0  # Whisper's window; longer clips are transcribed in pieces of at most this length
CACHE_MEMBER, CACHE_ID_MEMBER = "enc.npy", "enc.txt"  # cached frozen-encoder output [T, D] (float16) and its encoder


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


def load_encoder(spec: str):
    """`model.speech.encoder` -> the encoder module: `whisper:PATH` (pretrained) or `conformer:PRESET` (fresh)."""
    kind, _, arg = spec.partition(":")
    if kind == "whisper" and arg:
        return load_whisper_encoder(resolve(arg))
    if kind == "conformer" and arg in CONFORMER_PRESETS:
        return ConformerEncoder(CONFORMER_PRESETS[arg])
    raise ConfigError(f"encoder {spec!r}: use whisper:PATH or conformer:PRESET")


def chunks(wave: torch.Tensor, seconds: float = CHUNK_SECONDS) -> list[torch.Tensor]:
    """A 16 kHz clip in consecutive pieces of at most `seconds` (the last one at least MIN_SECONDS long)."""
    n = int(seconds * 16000)
    pieces = list(wave.split(n))
    if len(pieces) > 1 and pieces[-1].numel() < MIN_SECONDS * 16000:
        pieces[-2:] = [wave[-(pieces[-2].numel() + pieces[-1].numel()) :]]
    return pieces


# --- the part -------------------------------------------------------------------------------------------------
def build(tower, cfg, parts) -> SpeechPart:
    c = cfg.speech
    adapter = ADAPTER_PRESETS[c.adapter]
    return build_speech_part(
        tower, load_encoder(c.encoder), adapter, freeze_encoder=c.freeze_encoder, ctc_weight=c.ctc_weight
    )


def meta(part: SpeechPart) -> dict:
    return {
        "encoder": "whisper" if part.whisper else "conformer",
        "encoder_args": dataclasses.asdict(part.encoder.args),
        "adapter_args": dataclasses.asdict(part.adapter.args),
        "freeze_encoder": part.freeze_encoder,
        "ctc_weight": part.ctc.weight if part.ctc is not None else 0.0,
    }


def from_meta(tower, meta: dict, parts: dict, source: str) -> SpeechPart:
    if meta["encoder"] == "whisper":
        enc = WhisperEncoder(WhisperArgs(**meta["encoder_args"]))
    else:
        enc = ConformerEncoder(ConformerArgs(**meta["encoder_args"]))
    adapter = SpeechAdapter(enc.args.width, tower.args.dim, AdapterArgs(**meta["adapter_args"]))
    return SpeechPart(
        tower.args, enc, adapter, freeze_encoder=meta["freeze_encoder"], ctc_weight=meta.get("ctc_weight", 0.0)
    )


def _pad(xs: list, dev):
    lens = torch.tensor([x.shape[0] for x in xs], device=dev)
    batch = torch.zeros(len(xs), int(lens.max()), xs[0].shape[1], device=dev)
    for i, x in enumerate(xs):
        batch[i, : x.shape[0]] = x
    return batch, lens


def encode_speech(part: SpeechPart, features: list | None, encoded: list | None, dev) -> list:
    """Per sample features [frames, n_mels], or cached encoder output [T, D_enc], or None -> adapter rows [n, D] or
    None (one batched encoder call for the live ones, one adapter call for all)."""
    n = len(features if features is not None else encoded)
    features, encoded = features or [None] * n, encoded or [None] * n
    live = [b for b in range(n) if features[b] is not None and encoded[b] is None]
    hs: dict[int, torch.Tensor] = {b: encoded[b].to(dev) for b in range(n) if encoded[b] is not None}
    if live:
        h, lens = part.run_encoder(*_pad([features[b] for b in live], dev))
        hs.update({b: h[i, : int(lens[i])] for i, b in enumerate(live)})
    out = [None] * n
    if hs:
        order = sorted(hs)
        batch, lens = _pad([hs[b] for b in order], dev)
        for b, rows in zip(order, part.adapt(batch, lens), strict=True):
            out[b] = rows
    return out


def prepare(model, input_ids, inputs, cache_kv):
    feats, enc = inputs.get("speech_features"), inputs.get("speech_encoded")
    if all(x is None or all(f is None for f in x) for x in (feats, enc)):
        return None
    return encode_speech(model.speech, feats, enc, model.tok_embeddings.weight.device)


def input_rows(model, h_BTD, input_ids, state):
    """Adapter rows into the `<|speech|>` positions of each sample (None: a sample without audio)."""
    placeholder = model.token_id("speech")
    h_BTD = h_BTD.clone()
    for b, rows in enumerate(state):
        where = (input_ids[b] == placeholder).nonzero().squeeze(-1)
        n = 0 if rows is None else rows.shape[0]
        if len(where) != n:
            raise ValueError(f"sample {b}: {len(where)} <|speech|> placeholders but {n} speech rows")
        if n:
            h_BTD[b, where] = rows.to(h_BTD.dtype)
    return h_BTD


def aux_loss(model, state, input_ids, labels):
    """The CTC loss of the adapter rows against each sample's transcript (its labelled ids, end of text dropped),
    when the part has a CTC head, labels are given and it trains."""
    part = model.speech
    if part.ctc is None or labels is None or not part.training:
        return None
    rows, targets = [], []
    for b, r in enumerate(state):
        if r is not None:
            t = labels[b][labels[b] >= 0]  # the transcript's ids, then its end-of-text id (text_target)
            rows.append(r)
            targets.append(t[:-1])
    if not rows:
        return None
    return part.ctc.loss_sum(model.tower.tok_embeddings.weight, rows, targets)


# --- data and inference -----------------------------------------------------------------------------------------
def read_cached(raw: dict) -> torch.Tensor:
    try:
        arr = np.load(io.BytesIO(raw[CACHE_MEMBER]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError("bad_cache", f"{raw.get('__shard__')}:{raw.get('__key__')}: {CACHE_MEMBER}: {e}") from None
    if arr.ndim != 2 or arr.shape[0] == 0:
        where = f"{raw.get('__shard__')}:{raw.get('__key__')}"
        raise SampleError("bad_cache", f"{where}: {CACHE_MEMBER} has shape {arr.shape}, expected [frames, width]")
    return torch.from_numpy(arr.astype(np.float32))


class SpeechSamples:
    """Items laid out `[BOS] Repeat after me in LANGUAGE: <|speech|> x n` (+ transcript in training) with the clip's
    features, or, for a frozen encoder whose outputs are cached in the shard (`enc.npy` by this encoder), those."""

    def __init__(
        self,
        count: SpeechTokenCount,
        token_id: int,
        tok,
        max_text_tokens: int = 0,
        cached_encoder: str = "",
        language: str = "English",
    ):
        self.count, self.token_id, self.tok, self.max_text = count, token_id, tok, max_text_tokens
        self.cached_encoder, self.language = cached_encoder, language

    @classmethod
    def of(cls, model, tok, **kw) -> SpeechSamples:
        return cls(SpeechTokenCount.of(model.speech), model.token_id("speech"), tok, **kw)

    def prompt(self, n: int) -> list[int]:
        return bos_prefix(self.tok) + self.tok.encode(ASR_PROMPT.format(language=self.language)) + [self.token_id] * n

    def request(self, wave: torch.Tensor) -> dict:
        feats = clip_features(wave, self.count.whisper)
        return {"input_ids": self.prompt(self.count(feats.shape[0])), "speech": feats}

    def __call__(self, raw: dict) -> dict:
        target = text_target(self.tok, raw, self.max_text)
        if self.cached_encoder and raw.get(CACHE_ID_MEMBER, b"").decode(errors="replace") == self.cached_encoder:
            enc = read_cached(raw)
            prompt = self.prompt(self.count.from_encoder_frames(enc.shape[0]))
            return {**build_example(prompt, target), "speech_enc": enc}
        limit = CHUNK_SECONDS if self.count.whisper else None
        item = self.request(decode_member(raw, AUDIO, min_seconds=MIN_SECONDS, max_seconds=limit))
        return {**item, **build_example(item["input_ids"], target)}


def samples(model, tok, cfg) -> SpeechSamples:
    c = cfg.model.speech
    cached = c.encoder if c.freeze_encoder else ""
    return SpeechSamples.of(model, tok, max_text_tokens=cfg.data.max_text_tokens, cached_encoder=cached)


def collate(items: list[dict]) -> dict:
    feats, enc = [it.get("speech") for it in items], [it.get("speech_enc") for it in items]
    if all(x is None for x in feats + enc):
        return {}
    return {"speech_features": feats, "speech_encoded": enc}


def requests(model, tok, data: bytes, name: str, ext: str, opts):
    wave = AUDIO.decode(data, name, ext, min_seconds=MIN_SECONDS)
    maker = SpeechSamples.of(model, tok, language=opts.language)
    return [maker.request(piece) for piece in chunks(wave)], wave.numel() / 16000


def finish(text: str) -> str:
    return collapse_loop(first_line(text))


# --- shards with cached encoder outputs -------------------------------------------------------------------------
def cache_encoder_outputs(encoder, encoder_id: str, index, out_dir, *, batch: int = 32, replace: bool = False):
    """Copy speech shards with each clip's frozen-encoder output added (`enc.npy`, float16 [T, D], and `enc.txt`
    = `encoder_id`, the config's `model.speech.encoder`): training a frozen-encoder adapter on the copy runs the
    encoder once per clip instead of once per step (`mm-llama shards encode`). Clips that do not decode are copied
    unchanged (the loader counts and skips them, as without a cache)."""
    encoder = encoder.eval()
    whisper = isinstance(encoder, WhisperEncoder)
    dev = next(encoder.parameters()).device

    def add(samples):
        feats, where = [], []
        for i, s in enumerate(samples):
            ext = next((e for e in AUDIO.exts if e in s), None)
            try:
                wave = AUDIO.decode(s[ext], s["__key__"], ext, min_seconds=MIN_SECONDS, max_seconds=CHUNK_SECONDS)
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


# --- scale ------------------------------------------------------------------------------------------------------
PLAN_AUDIO_SECONDS = 30.0  # the memory plan's clip: Whisper's window, the longest the data path takes


def plan_pieces(part: SpeechPart, parts, batch: int, seq_len: int, dtype, cfg) -> PlanPieces:
    meta_dev = {"device": "meta"}
    frames = int(PLAN_AUDIO_SECONDS * 100) + 1  # 10 ms hop
    n_mels = getattr(part.encoder.args, "n_mels", 80)
    feats = torch.empty(batch, frames, n_mels, dtype=dtype, **meta_dev)
    lens = torch.full((batch,), frames, dtype=torch.long, **meta_dev)
    h, h_len = part.run_encoder(feats, lens)
    out, _ = part.adapter(h, h_len)  # [B, rows, D]: spliced into each sequence
    pieces = [
        Piece("speech encoder", lambda: part.run_encoder(feats, lens), units=tuple(part.encoder.layers)),
        Piece("speech adapter", lambda: part.adapter(h, h_len), shared=(h,)),
    ]
    shared = tensor_bytes(h) if any(p.requires_grad for p in part.adapter.parameters()) else 0
    # the spliced rows need gradients through every tower layer: lowest layer 0
    return PlanPieces(pieces, shared_bytes=shared, extra_rows=out.shape[1], lowest_layer=0)


SPEC = Modality(
    name="speech",
    format="mm_llama.speech_adapter.v1",
    rows=1,  # <|speech|>
    part=PartHooks(
        Config=SpeechConfig,
        build=build,
        meta=meta,
        from_meta=from_meta,
        row_table=lambda parts: (parts["speech"].learnable_embedding, 0),
        inputs=("speech_features", "speech_encoded"),
        prepare=prepare,
        input_rows=input_rows,
        step_state=lambda state, start, n: state if start == 0 else None,  # spliced at prefill only
        aux_loss=aux_loss,
        encoders=lambda part: [part.encoder],
    ),
    data=DataHooks(medium=AUDIO, samples=samples, collate=collate),
    inference=InferenceHooks(
        what="transcript", requests=requests, stop_ids=lambda tok: tok.ids_starting_with(b"\n"), finish=finish
    ),
    evaluation=EvalHooks(metrics=wer_cer),
    scale=ScaleHooks(shard_units=lambda part: list(part.encoder.layers), plan_pieces=plan_pieces),
)
