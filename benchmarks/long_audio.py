"""Long recordings vs the same utterances one by one, with a trained speech adapter (the demo's by default).

Builds one recording from the held-out test utterances (`runs/demo/shards/speech_test`: unseen sentences, unseen
voices) joined with 0.3-0.8 s pauses until it is --minutes long, transcribes it as `mm-llama asr` does (cut in its
pauses into pieces of at most the adapter's piece_seconds, answered, joined), and transcribes the same utterances
one by one. WER of each against the same words; the ratio is the long-audio figure.
Usage: python benchmarks/long_audio.py [--run runs/demo] [--minutes 10] [--piece-seconds S]
Last line (JSON): wer_one_by_one, wer_long, ratio, pieces, seconds, utterances, piece_seconds.
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
from mm_llama.adapters.files import load_composed
from mm_llama.adapters.generation import answer_file
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.assets import resolve
from mm_llama.data.audio import decode_audio, speech_pieces
from mm_llama.data.shards import expand_urls, read_samples
from mm_llama.llama import Tokenizer, load_source
from mm_llama.text import wer_cer


def main() -> None:
    # long: a benchmark reads top to bottom: the recording, both transcriptions, the figures
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--piece-seconds", type=float, default=None, help="override the adapter's piece length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Path(args.run)
    tower = load_source(resolve("asset:smollm2_gguf"))
    model = load_composed(tower, [run / "speech/adapter.safetensors"])
    tok = Tokenizer.from_pretrained(resolve("asset:smollm2_gguf"))
    if args.piece_seconds:
        model.speech.piece_seconds = args.piece_seconds
    samples = read_samples(expand_urls(str(run / "shards/speech_test/index.json")))
    g = np.random.default_rng(args.seed)
    waves, refs, total = [], [], 0.0
    while total < args.minutes * 60:
        s = samples[len(waves) % len(samples)]
        waves.append(decode_audio(s["wav"], s["__key__"], "wav"))
        refs.append(s["txt"].decode())
        total += waves[-1].numel() / 16000 + 0.55
    t0 = time.perf_counter()
    one = []
    for i in range(0, len(waves), 16):
        one += transcribe(model, tok, waves[i : i + 16], max_new_tokens=48)
    t_one = time.perf_counter() - t0
    parts = []
    for w in waves:
        parts += [w.numpy(), g.normal(0, 1e-3, int(g.uniform(0.3, 0.8) * 16000)).astype(np.float32)]
    recording = np.concatenate(parts)
    buf = io.BytesIO()
    sf.write(buf, recording, 16000, format="WAV")
    t0 = time.perf_counter()
    text, seconds = answer_file(model, tok, "speech", buf.getvalue(), "long.wav", AnswerOptions(max_new_tokens=160))
    t_long = time.perf_counter() - t0
    pieces = len(speech_pieces(torch.from_numpy(recording), model.speech.piece_seconds))
    joined = " ".join(refs)
    w_one = wer_cer([joined], [" ".join(one)])["wer"]
    w_long = wer_cer([joined], [text])["wer"]
    limit = model.speech.piece_seconds
    print(
        f"{len(waves)} utterances, {seconds / 60:.1f} min, {len(joined.split())} words; {pieces} pieces <= {limit:g} s"
    )
    ratio = w_long / max(w_one, 1e-9)
    print(f"one by one: WER {w_one:.1%} ({t_one:.0f} s)   long: WER {w_long:.1%} ({t_long:.0f} s)   ratio {ratio:.2f}")
    print(f"long transcript starts: {text[:200]!r}")
    print(
        json.dumps(
            {
                "wer_one_by_one": round(w_one, 4),
                "wer_long": round(w_long, 4),
                "ratio": round(w_long / max(w_one, 1e-9), 3),
                "pieces": pieces,
                "seconds": round(seconds, 1),
                "utterances": len(waves),
                "piece_seconds": model.speech.piece_seconds,
                "words_long": len(text.split()),
                "words_ref": len(joined.split()),
            }
        )
    )


if __name__ == "__main__":
    main()
