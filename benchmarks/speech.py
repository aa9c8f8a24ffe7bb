"""Speech path throughput and memory on demo-size models (CPU, fp32, medians).

  encoder + adapter throughput, seconds of audio per second: Whisper tiny.en (frozen, CTranslate2 weights) and the
  small Conformer, each with the small speech adapter (8 clips of 5 s)
  ASR real-time factor: Whisper tiny.en + adapter + SmolLM2-135M tower, greedy, 24 new tokens, one 5 s clip
  memory vs clip length (5/15/30/60 s, small Conformer + adapter, inference): peak RSS added, fresh process each
Usage: python benchmarks/speech.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from mm_llama.adapters.asr import transcribe
from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
from mm_llama.adapters.speech_part import build_speech_part, clip_features
from mm_llama.adapters.whisper import load_whisper_encoder
from mm_llama.assets import asset_path
from mm_llama.llama import Tokenizer, load_pretrained

MEM_CHILD = r"""
import sys, torch, json
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder, SpeechAdapter
from mm_llama.data.audio import log_mel
torch.manual_seed(0)
enc = ConformerEncoder(CONFORMER_PRESETS["small"]).eval()
ad = SpeechAdapter(enc.out_dim, 576, ADAPTER_PRESETS["small"]).eval()
wave = torch.randn(int(float(sys.argv[1]) * 16000)) * 0.1
feats = log_mel(wave)[None]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
with torch.inference_mode():
    h, l = enc(feats, torch.tensor([feats.shape[1]]))
    out, _ = ad(h, l)
print(json.dumps({"added": status("VmHWM:") - base, "tokens": out.shape[1]}))
"""


def median(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    tower = load_pretrained(asset_path("smollm2_gguf"))
    tok = Tokenizer.from_pretrained(asset_path("smollm2_gguf"))
    whisper = load_whisper_encoder(asset_path("whisper_tiny_en_ct2"))
    small = ADAPTER_PRESETS["small"]
    models = {
        "whisper tiny.en + adapter(small)": build_speech_part(tower, whisper, small, freeze_encoder=True),
        "conformer(small) + adapter(small)": build_speech_part(
            tower, ConformerEncoder(CONFORMER_PRESETS["small"]), small
        ),
    }
    waves = [torch.randn(5 * 16000, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(8)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'encoder + adapter':<36}{'audio s / s':>12}")
    for name, m in models.items():
        m.eval()
        feats = [clip_features(w, m.whisper) for w in waves]
        batch = torch.stack(feats)
        lengths = torch.tensor([f.shape[0] for f in feats])

        def run(m=m, batch=batch, lengths=lengths):
            with torch.inference_mode():
                m.encode(batch, lengths)

        t = median(run, args.repeats)
        print(f"{name:<36}{len(waves) * 5 / t:>12.1f}")
    m = ComposedModel(tower, speech=models["whisper tiny.en + adapter(small)"]).eval()
    t = median(lambda: transcribe(m, tok, waves[:1], max_new_tokens=24), args.repeats)
    print(f"ASR real-time factor (whisper tiny.en + adapter + SmolLM2-135M, 5 s clip, <=24 tokens): {t / 5:.3f}")
    print(f"{'clip length':<14}{'peak RSS added (MB)':>22}{'adapter tokens':>16}")
    for sec in (5, 15, 30, 60):
        out = subprocess.run([sys.executable, "-c", MEM_CHILD, str(sec)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{sec:>5} s{'':<8}{r['added'] / 1e6:>22.0f}{r['tokens']:>16}")


if __name__ == "__main__":
    main()
