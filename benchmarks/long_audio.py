"""Long recordings vs the same utterances one by one, with a trained speech adapter (the demo's by default).

Builds one recording from the held-out test utterances (`runs/demo/shards/speech_test`: unseen sentences, unseen
voices) joined with 0.3-0.8 s pauses until it is --minutes long, transcribes it as `mm-llama asr` does (cut in its
pauses into pieces of at most the adapter's piece_seconds, answered, joined), and transcribes the same utterances
one by one. WER of each against the same words; the ratio is the long-audio figure.

With `--join K` it builds many short files instead, each of K utterances joined the same way and no longer than the
adapter's piece_seconds, so each is answered as ONE piece (the case of two sentences in one short file): the
figure is the WER of those files against the same utterances one by one.
Usage: python benchmarks/long_audio.py [--run runs/demo] [--minutes 10] [--join K] [--piece-seconds S] [--dtype D]
The tower is in the dtype the adapter was trained on (`--dtype auto`, as `mm-llama asr`), the adapter in fp32.
Last line (JSON): wer_one_by_one, wer_long, ratio, pieces, seconds, utterances, piece_seconds, tower_dtype, files.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from mm_llama.adapters.asr import transcribe
from mm_llama.adapters.files import load_composed, trained_tower_dtype
from mm_llama.adapters.generation import answer_file
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.assets import resolve
from mm_llama.data.audio import decode_audio, speech_pieces
from mm_llama.data.shards import expand_urls, read_samples
from mm_llama.llama import Tokenizer, load_source
from mm_llama.text import wer_cer


def joined(waves: list[torch.Tensor], g: np.random.Generator) -> np.ndarray:
    """The utterances one after another, each followed by a 0.3-0.8 s pause of faint noise."""
    parts = []
    for w in waves:
        parts += [w.numpy(), g.normal(0, 1e-3, int(g.uniform(0.3, 0.8) * 16000)).astype(np.float32)]
    return np.concatenate(parts)


def files_of(waves: list[torch.Tensor], join: int, limit: float, g: np.random.Generator) -> list[tuple]:
    """--join K: consecutive groups of K utterances whose joined recording fits in `limit` seconds ->
    [(utterance indices, recording)]; 0: one recording of them all."""
    if not join:
        return [(list(range(len(waves))), joined(waves, g))]
    out = []
    for i in range(0, len(waves) - join + 1, join):
        rec = joined(waves[i : i + join], g)
        if len(rec) / 16000 <= limit:
            out.append((list(range(i, i + join)), rec))
    return out


def main() -> None:
    # long: a benchmark reads top to bottom: the recordings, both transcriptions, the figures
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--join", type=int, default=0, help="files of K utterances, each under piece_seconds")
    ap.add_argument("--piece-seconds", type=float, default=None, help="override the adapter's piece length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="the tower's (as asr)")
    args = ap.parse_args()
    run = Path(args.run)
    files = [run / "speech/adapter.safetensors"]
    dtype = trained_tower_dtype(files) if args.dtype == "auto" else args.dtype  # a bf16-trained adapter: bf16 tower
    model = load_composed(load_source(resolve("asset:smollm2_gguf"), dtype=getattr(torch, dtype)), files)
    tok = Tokenizer.from_pretrained(resolve("asset:smollm2_gguf"))
    if args.piece_seconds:
        model.speech.piece_seconds = args.piece_seconds
    limit = model.speech.piece_seconds
    samples = read_samples(expand_urls(str(run / "shards/speech_test/index.json")))
    g = np.random.default_rng(args.seed)
    waves, refs, total = [], [], 0.0
    while total < args.minutes * 60 and (not args.join or len(waves) < len(samples)):
        s = samples[len(waves) % len(samples)]
        waves.append(decode_audio(s["wav"], s["__key__"], "wav"))
        refs.append(s["txt"].decode())
        total += waves[-1].numel() / 16000 + 0.55
    files = files_of(waves, args.join, limit, g)
    used = [i for idx, _ in files for i in idx]
    t0 = time.perf_counter()
    one = []
    for i in range(0, len(used), 16):
        one += transcribe(model, tok, [waves[j] for j in used[i : i + 16]], max_new_tokens=48)
    t_one = time.perf_counter() - t0
    t0, texts, seconds, pieces = time.perf_counter(), [], 0.0, 0
    for _, recording in files:
        buf = io.BytesIO()
        sf.write(buf, recording, 16000, format="WAV")
        text, s = answer_file(model, tok, "speech", buf.getvalue(), "long.wav", AnswerOptions(max_new_tokens=160))
        texts.append(text)
        seconds += s
        pieces += len(speech_pieces(torch.from_numpy(recording), limit))
    t_long = time.perf_counter() - t0
    ref_files = [" ".join(refs[i] for i in idx) for idx, _ in files]
    w_one = wer_cer([" ".join(refs[i] for i in used)], [" ".join(one)])["wer"]
    w_long = wer_cer(ref_files, texts)["wer"]
    words = sum(len(r.split()) for r in ref_files)
    print(f"{len(used)} utterances in {len(files)} file(s), {seconds / 60:.1f} min, {words} words; {pieces} pieces")
    ratio = w_long / max(w_one, 1e-9)
    print(f"one by one: WER {w_one:.1%} ({t_one:.0f} s)  joined: WER {w_long:.1%} ({t_long:.0f} s)  ratio {ratio:.2f}")
    print(f"first file's transcript: {texts[0][:200]!r}\n  reference: {ref_files[0][:200]!r}")
    print(
        json.dumps(
            {
                "wer_one_by_one": round(w_one, 4),
                "wer_long": round(w_long, 4),
                "ratio": round(ratio, 3),
                "pieces": pieces,
                "seconds": round(seconds, 1),
                "utterances": len(used),
                "files": len(files),
                "piece_seconds": limit,
                "tower_dtype": dtype,
                "words_long": sum(len(t.split()) for t in texts),
                "words_ref": words,
            }
        )
    )


if __name__ == "__main__":
    main()
