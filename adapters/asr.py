"""Speech recognition / translation with a fused speech model: audio -> features -> adapter embeddings spliced at
prefill (encoded once per request) -> greedy or sampled decoding; WER/CER after standard text normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mm_llama.generate import bos_prefix, generate_ids, padding_id
from mm_llama.llama.model import Transformer
from mm_llama.text import normalize_text

from .fusion import TOKEN_ROWS
from .speech import AdapterArgs, ConformerArgs, ConformerEncoder, SpeechAdapter
from .speech_fusion import ASR_PROMPT, FusedSpeechModel, clip_features
from .whisper import WhisperEncoder


def wer_cer(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Word and character error rates (jiwer) over normalised texts."""
    import jiwer

    refs = [normalize_text(r) or "<empty>" for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)), "n": len(refs)}


def wer_cer_by(references: Sequence[str], hypotheses: Sequence[str], groups: Sequence[str]) -> dict[str, dict]:
    """`wer_cer` per group (e.g. per voice), groups in sorted order."""
    return {
        g: wer_cer([r for r, x in zip(references, groups) if x == g], [h for h, x in zip(hypotheses, groups) if x == g])
        for g in sorted(set(groups))
    }


def features_for(model: FusedSpeechModel, wave: torch.Tensor) -> torch.Tensor:
    """[frames, n_mels] features of a 16 kHz clip for this model's encoder."""
    return clip_features(wave, isinstance(model.encoder, WhisperEncoder))


def prompt_ids(tok, model: FusedSpeechModel, n_speech: int, language: str = "English", template: str = ASR_PROMPT):
    ids = bos_prefix(tok)
    return ids + tok.encode(template.format(language=language)) + [model.placeholder_id] * n_speech


def first_line(text: str) -> str:
    """The transcript: the decoded text up to its first line break (a token such as ".\\n" can end it mid-token)."""
    return text.strip().split("\n", 1)[0].strip()


def collapse_loop(text: str, min_copies: int = 3) -> str:
    """A transcript that ends in a runaway loop (a phrase of one or more words repeated `min_copies` or more times
    back to back, the last copy possibly cut short by the token limit) keeps one copy of the phrase: "walk down the
    side of the side of the side of the" -> "walk down the side of". The shortest looping phrase wins; text
    without such a tail is returned as it is (two copies, "steps steps", are left alone)."""
    words = text.split()
    n = len(words)
    for size in range(1, n // min_copies + 1):
        start = n - size  # the periodic tail words[start:] with period `size`, grown backwards
        while start > 0 and words[start - 1] == words[start - 1 + size]:
            start -= 1
        if n - start >= min_copies * size:
            return " ".join(words[: start + size])
    return text


@torch.inference_mode()
def transcribe(model: FusedSpeechModel, tok, waves: Sequence[torch.Tensor], *, language="English",
               template=ASR_PROMPT, max_new_tokens=64, temperature=0.0, on_token=None,
               one_line: bool = True, collapse_loops: bool = True) -> list[str]:  # fmt: skip
    """Transcripts of 16 kHz clips (one batched encoder call and one batched decode). `one_line`: a transcript
    ends at its first line break (decoding stops at a token that begins one); after a missed stop token the tower
    otherwise runs on past the sentence ("...\\n\\nThe original sentence is: ..."). Training transcripts are single
    lines, so the rule removes only text the adapter was never taught to produce. `collapse_loops`: a runaway loop at
    the end keeps one copy of its phrase (`collapse_loop`)."""
    feats = [features_for(model, w) for w in waves]
    lengths = torch.tensor([f.shape[0] for f in feats])
    batch = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for b, f in enumerate(feats):
        batch[b, : f.shape[0]] = f
    dev = model.tower.tok_embeddings.weight.device
    speech = model.encode_speech(batch.to(dev), lengths.to(dev))
    ids = [prompt_ids(tok, model, s.shape[0], language, template) for s in speech]

    def forward_extra(pad, start, n):
        return {"speech": speech} if start == 0 else {}

    pad = padding_id(tok)
    stops = set(tok.stop_ids) | (tok.ids_starting_with(b"\n") if one_line else set())
    out = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops,
                       pad_id=pad, on_token=on_token, forward_extra=forward_extra)  # fmt: skip
    texts = [first_line(tok.decode(o)) if one_line else tok.decode(o).strip() for o in out]
    return [collapse_loop(t) for t in texts] if collapse_loops else texts


# --- speech adapter checkpoints (trainable weights + what rebuilds the modules) ----------------------------


def save_speech_adapter(model: FusedSpeechModel, path: str | Path) -> None:
    import dataclasses

    from .checkpoint import save_trainable

    enc = model.encoder
    meta = {
        "format": "mm_llama.speech_adapter.v1",
        "token_rows": {"speech": list(TOKEN_ROWS["speech"])},
        "encoder": "whisper" if isinstance(enc, WhisperEncoder) else "conformer",
        "encoder_args": dataclasses.asdict(enc.args),
        "adapter_args": dataclasses.asdict(model.adapter.args),
        "freeze_encoder": model.freeze_encoder,
        "ctc_weight": model.ctc.weight if model.ctc is not None else 0.0,
        "tower": {"dim": model.tower.args.dim, "vocab_size": model.tower.args.vocab_size},
    }
    save_trainable(model, path, meta, "tower.")


def build_speech_model(tower: Transformer, encoder: torch.nn.Module, adapter_args: AdapterArgs, **kw):
    """Tower + encoder (Conformer or Whisper) + a fresh speech adapter (tower frozen; outputs start at the scale of
    the tower's token table)."""
    adapter = SpeechAdapter(encoder.args.width, tower.args.dim, adapter_args)
    if not tower.tok_embeddings.weight.is_meta:  # the meta device: the memory plan's model (shapes only)
        adapter.init_output_scale(float(tower.tok_embeddings.weight.detach().float().std()))
    return FusedSpeechModel(tower, encoder, adapter, **kw)


def load_speech_adapter(tower: Transformer, path: str | Path) -> FusedSpeechModel:
    from mm_llama.llama.checkpoint import CheckpointError

    from .checkpoint import load_trainable, read_adapter_meta
    from .whisper import WhisperArgs

    meta = read_adapter_meta(path)
    want = meta["tower"]
    if (want["dim"], want["vocab_size"]) != (tower.args.dim, tower.args.vocab_size):
        raise CheckpointError(f"{path}: adapter was trained on a tower with {want}, this one has "
                              f"dim={tower.args.dim}, vocab_size={tower.args.vocab_size}")  # fmt: skip
    if meta["encoder"] == "whisper":
        enc = WhisperEncoder(WhisperArgs(**meta["encoder_args"]))
    else:
        enc = ConformerEncoder(ConformerArgs(**meta["encoder_args"]))
    model = build_speech_model(tower, enc, AdapterArgs(**meta["adapter_args"]), freeze_encoder=meta["freeze_encoder"],
                               ctc_weight=meta.get("ctc_weight", 0.0))  # fmt: skip
    load_trainable(model, path, "tower.")
    model.to(tower.tok_embeddings.weight.device)
    return model.eval()
