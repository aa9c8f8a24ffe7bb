"""Speech: an encoder (the paper's Conformer, or a pretrained Whisper encoder) + the speech adapter, whose output
rows replace `<|speech|>` placeholders in the input sequence (one per 80 ms).

A sample is laid out `[BOS] Repeat after me in English: <|speech|> x n` + transcript, n = the adapter's rows for the
clip. Answers are one line (decoding stops at a token that begins a new line; the tower otherwise runs on past the
sentence) and a runaway loop at the end keeps one copy of its phrase (mm_llama.text.collapse_loop). Audio longer
than the adapter's piece length (model.speech.piece_seconds, at most Whisper's 30 s window) is cut in its pauses
(data.audio.speech_pieces: voice activity on the waveform) into pieces that are answered and joined.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mm_llama.assets import resolve
from mm_llama.config import ConfigError, bounded, choice
from mm_llama.data.audio import speech_pieces, trim_to_voice
from mm_llama.data.badsamples import SampleError
from mm_llama.data.collate import segment_bounds
from mm_llama.data.conversation import Part
from mm_llama.data.media import AUDIO
from mm_llama.data.writer import derive_shards
from mm_llama.text import collapse_loop, first_line, wer_cer

from ..modality import DataHooks, EvalHooks, InferenceHooks, Modality, PartHooks, ScaleHooks
from ..plan import Piece, PlanPieces, tensor_bytes
from ..samples import plain_requests
from ..speech import ADAPTER_PRESETS, CONFORMER_PRESETS, AdapterArgs, ConformerArgs, ConformerEncoder, SpeechAdapter
from ..speech_part import INPUTS, SpeechPart, SpeechTokenCount, build_speech_part, clip_features, run_encoder
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
    # answering: a recording longer than this is cut in its pauses into pieces at most this long (the clip lengths
    # the adapter trained on; Whisper's window, 30 s, at most), each transcribed, the texts joined
    piece_seconds: float = bounded(30.0, 1.0, 30.0)
    # what the tower reads at the <|speech|> positions: "rows", the adapter's output rows, or "ctc_posterior", each
    # row's CTC posterior over the tower's token table weighting the tower's own token embeddings (LegoSLM; needs
    # ctc_weight > 0)
    inputs: str = choice("rows", *INPUTS)

    def __post_init__(self):
        kind, _, arg = self.encoder.partition(":")
        if kind == "conformer" and arg in CONFORMER_PRESETS or kind == "whisper" and arg:
            if self.inputs == "ctc_posterior" and self.ctc_weight <= 0:
                raise ConfigError(
                    "model.speech.inputs: ctc_posterior reads the CTC head: set model.speech.ctc_weight > 0"
                )
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


# --- the part -------------------------------------------------------------------------------------------------
def build(tower, cfg, parts) -> SpeechPart:
    c = cfg.speech
    adapter = ADAPTER_PRESETS[c.adapter]
    return build_speech_part(
        tower,
        load_encoder(c.encoder),
        adapter,
        freeze_encoder=c.freeze_encoder,
        ctc_weight=c.ctc_weight,
        piece_seconds=c.piece_seconds,
        inputs=c.inputs,
    )


def meta(part: SpeechPart) -> dict:
    return {
        "encoder": "whisper" if part.whisper else "conformer",
        "encoder_args": dataclasses.asdict(part.encoder.args),
        "adapter_args": dataclasses.asdict(part.adapter.args),
        "freeze_encoder": part.freeze_encoder,
        "ctc_weight": part.ctc.weight if part.ctc is not None else 0.0,
        "piece_seconds": part.piece_seconds,
        "inputs": part.inputs,
    }


def from_meta(tower, meta: dict, parts: dict, source: str) -> SpeechPart:
    if meta["encoder"] == "whisper":
        enc = WhisperEncoder(WhisperArgs(**meta["encoder_args"]))
    else:
        enc = ConformerEncoder(ConformerArgs(**meta["encoder_args"]))
    adapter = SpeechAdapter(enc.args.width, tower.args.dim, AdapterArgs(**meta["adapter_args"]))
    return SpeechPart(
        tower.args,
        enc,
        adapter,
        freeze_encoder=meta["freeze_encoder"],
        ctc_weight=meta.get("ctc_weight", 0.0),
        piece_seconds=meta.get("piece_seconds", CHUNK_SECONDS),  # files written before: Whisper's window
        inputs=meta.get("inputs", "rows"),
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


def _per_clip(value) -> list:
    """A sample's clips as a list (entries may be None): a list, one tensor (one clip) or None (none)."""
    if value is None:
        return []
    return [value] if torch.is_tensor(value) else list(value)


def prepare(model, input_ids, inputs, cache_kv):
    """Each sample's adapter rows, its clips' rows one after another in order (None: a sample without audio).
    Inputs per sample: a list of clips (features [frames, n_mels] or cached encoder outputs), one clip, or None."""
    feats, enc = inputs.get("speech_features"), inputs.get("speech_encoded")
    B = len(feats if feats is not None else enc or [])
    feats = [_per_clip(f) for f in feats] if feats is not None else [[] for _ in range(B)]
    enc = [_per_clip(e) for e in enc] if enc is not None else [[] for _ in range(B)]
    owner, flat_f, flat_e = [], [], []
    for b in range(B):
        n = max(len(feats[b]), len(enc[b]))
        for c in range(n):
            f = feats[b][c] if c < len(feats[b]) else None
            e = enc[b][c] if c < len(enc[b]) else None
            if f is not None or e is not None:
                owner.append(b)
                flat_f.append(f)
                flat_e.append(e)
    if not owner:
        return None
    rows = encode_speech(model.speech, flat_f, flat_e, model.tok_embeddings.weight.device)
    out = SpeechRows([None] * B)
    for b, r in zip(owner, rows, strict=True):
        out[b] = r if out[b] is None else torch.cat([out[b], r])
    out.segments = inputs.get("segment_ids")
    return out


class SpeechRows(list):
    """The speech state: per sample its adapter rows (None: no audio), and the packed rows' segment ids (or None)."""

    segments: torch.Tensor | None = None


def input_rows(model, h_BTD, input_ids, state):
    """Adapter rows into the `<|speech|>` positions of each sample (None: a sample without audio)."""
    placeholder = model.token_id("speech")
    h_BTD = h_BTD.clone()
    table = model.tower.tok_embeddings.weight
    for b, rows in enumerate(state):
        where = (input_ids[b] == placeholder).nonzero().squeeze(-1)
        n = 0 if rows is None else rows.shape[0]
        if len(where) != n:
            raise ValueError(f"sample {b}: {len(where)} <|speech|> placeholders but {n} speech rows")
        if n:
            h_BTD[b, where] = model.speech.tower_inputs(table, rows).to(h_BTD.dtype)
    return h_BTD


def aux_loss(model, state, input_ids, labels):
    """The CTC loss of the adapter rows against each sample's transcript (its labelled ids, end of text dropped),
    when the part has a CTC head, labels are given and it trains."""
    part = model.speech
    if part.ctc is None or labels is None or not part.training:
        return None
    rows, targets = [], []
    placeholder, T = model.token_id("speech"), labels.shape[1]
    for b, r in enumerate(state):
        if r is None:
            continue
        # each sample of a packed row on its own: its rows (its placeholders' count) against its own labels
        bounds = [(0, T)] if state.segments is None else segment_bounds(state.segments[b].tolist())
        used = 0
        for a, e in bounds:
            n = int((input_ids[b, a:e] == placeholder).sum())
            if n:
                t = labels[b, a:e][labels[b, a:e] >= 0]  # the transcript's ids, then its end-of-text id
                rows.append(r[used : used + n])
                targets.append(t[:-1])
                used += n
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


def decode_clip(data: bytes, name: str, ext: str, max_seconds: float | None) -> torch.Tensor:
    """A clip as a speech adapter reads it, in training (with or without cached encoder outputs) and in answers:
    16 kHz mono, cut to the shape of the training clips (data.audio.trim_to_voice)."""
    return trim_to_voice(AUDIO.decode(data, name, ext, min_seconds=MIN_SECONDS, max_seconds=max_seconds))


class SpeechMedia:
    """An audio part -> one `<|speech|>` id per adapter row + the clip's features, or, for a frozen encoder whose
    outputs are cached in the shard (`enc.npy` by this encoder), those; picklable."""

    def __init__(self, count: SpeechTokenCount, token_id: int, cached_encoder: str = ""):
        self.count, self.token_id, self.cached_encoder = count, token_id, cached_encoder
        self.max_seconds = CHUNK_SECONDS if count.whisper else None

    def decode(self, data: bytes, name: str, ext: str) -> torch.Tensor:
        return decode_clip(data, name, ext, self.max_seconds)

    def plain(self, raw: dict, ext: str):
        if self.cached_encoder and raw.get(CACHE_ID_MEMBER, b"").decode(errors="replace") == self.cached_encoder:
            return Encoded(read_cached(raw))
        return self.decode(raw[ext], raw["__key__"], ext)

    def splice(self, value) -> tuple[list[int], dict]:
        if isinstance(value, Encoded):
            return [self.token_id] * self.count.from_encoder_frames(value.rows.shape[0]), {"encoded": value.rows}
        feats = clip_features(value, self.count.whisper)
        return [self.token_id] * self.count(feats.shape[0]), {"features": feats}


@dataclass
class Encoded:
    """A clip's cached frozen-encoder output [T, D_enc]."""

    rows: torch.Tensor


def media(model, tok, opts, cfg=None) -> SpeechMedia:
    cached = cfg.speech.encoder if cfg is not None and cfg.speech.freeze_encoder else ""
    return SpeechMedia(SpeechTokenCount.of(model.speech), model.token_id("speech"), cached)


def turn(part, opts) -> list:
    """A transcript request: `Repeat after me in LANGUAGE:` then the clip (the prompt option is not used)."""
    return [Part("text", ASR_PROMPT.format(language=opts.language)), part]


def collate(items: list[dict]) -> dict:
    clips = [it.get("speech") or [] for it in items]
    if not any(clips):
        return {}
    feats = [[p.get("features") for p in c] or None for c in clips]
    enc = [[p.get("encoded") for p in c] or None for c in clips]
    return {"speech_features": feats, "speech_encoded": enc}


def requests(model, tok, data: bytes, name: str, ext: str, opts):
    wave = AUDIO.decode(data, name, ext, min_seconds=MIN_SECONDS)
    limit = model.speech.piece_seconds
    pieces = [wave[a:b] for a, b in speech_pieces(wave, limit)] or [wave[: int(limit * 16000)]]  # all quiet: one
    return plain_requests(model, tok, "speech", pieces, name, opts), wave.numel() / 16000


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
    cached = 0

    def add(samples):
        nonlocal cached
        feats, where = [], []
        for i, s in enumerate(samples):
            ext = next((e for e in AUDIO.exts if e in s), None)
            if ext is None:
                continue
            try:
                wave = decode_clip(s[ext], s["__key__"], ext, CHUNK_SECONDS)  # as SpeechMedia.plain without a cache
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
        cached += len(where)
        return extra

    rep = derive_shards(index, out_dir, add, batch=batch, prefix="cached", replace=replace)
    if not cached:  # e.g. an image index: a copy without one cached clip is not what was asked for
        for sh in rep.shards:
            (Path(out_dir) / sh["url"]).unlink(missing_ok=True)
        (Path(out_dir) / "index.json").unlink(missing_ok=True)
        raise ValueError(f"{index}: none of its {rep.written} samples holds a clip that decodes: nothing to cache")
    rep.reasons["not_cached"] = rep.written - cached  # clips that do not decode: copied as they are
    return rep


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
    data=DataHooks(medium=AUDIO, media=media, turn=turn, collate=collate),
    inference=InferenceHooks(
        what="transcript", requests=requests, stop_ids=lambda tok: tok.ids_starting_with(b"\n"), finish=finish
    ),
    evaluation=EvalHooks(metrics=wer_cer),
    scale=ScaleHooks(shard_units=lambda part: list(part.encoder.layers), plan_pieces=plan_pieces),
)
