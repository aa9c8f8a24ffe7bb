"""What one speech-adapter training step costs, per choice the demo made (CPU, fp32, medians of --repeats).

16 spoken-language clips (`recipes.demo.corpora.spoken_plan`, espeak-ng) in one batch on the real SmolLM2-135M tower
with the frozen Whisper tiny.en encoder, the training forward + backward of `ComposedModel` (what the recipe runs):

  token loss + CTC, 80 ms rows (small_whisper), encoder run live
  token loss + CTC, 160 ms rows (small_whisper_160ms), encoder run live
  token loss + CTC, 160 ms rows, encoder outputs from the cache (`cache_encoder_outputs`)
  CTC phase (objective=aux: the tower skipped), encoder run live
  CTC phase, encoder outputs from the cache

Prints a table and a final JSON line (seconds per step; ratios ours-first).
Usage: python benchmarks/speech_step.py [--clips 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.modalities.speech import cache_encoder_outputs, load_encoder
from mm_llama.adapters.registry import get_modality
from mm_llama.adapters.samples import SampleOptions, Samples
from mm_llama.adapters.speech import ADAPTER_PRESETS
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.assets import resolve
from mm_llama.data.collate import collate_text
from mm_llama.data.shards import read_index, read_samples
from mm_llama.data.writer import write_shards
from mm_llama.llama import Tokenizer, load_pretrained
from mm_llama.recipes.demo import corpora


def main() -> None:
    # long: a benchmark reads top to bottom: set-up, each variant timed, the ratios
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    enc_id = "whisper:asset:whisper_tiny_en_ct2"
    tower = load_pretrained(resolve("asset:smollm2_gguf"), dtype=torch.float32).requires_grad_(False).eval()
    tok = Tokenizer.from_pretrained(resolve("asset:smollm2_gguf"))
    spec = get_modality("speech")
    tmp = Path(tempfile.mkdtemp(prefix="speech_step_"))
    plan, _ = corpora.spoken_plan(args.clips, 1, seed=0)
    write_shards(corpora.speech_records(plan, "b"), tmp / "wav", progress=False)
    encoder = load_encoder(enc_id)
    cache_encoder_outputs(encoder, enc_id, tmp / "wav/index.json", tmp / "enc")
    raw = read_samples(read_index(tmp / "enc/index.json")[0])

    class Cfg:  # the parts of a training config the sample maker reads
        class data:
            max_text_tokens = 64

        class model:
            class speech:
                encoder, freeze_encoder = enc_id, True

    def build(adapter: str):
        torch.manual_seed(0)
        part = build_speech_part(tower, encoder, ADAPTER_PRESETS[adapter], freeze_encoder=True, ctc_weight=1.0)
        return ComposedModel(tower, speech=part).train()

    def batch(model, cached: bool):
        Cfg.model.speech.encoder = enc_id if cached else ""
        maker = Samples.of(model, tok, options=SampleOptions(max_text_tokens=64), cfg=Cfg.model)
        items = [maker(r) for r in raw]
        text = collate_text(items, pad_id=0)
        return {"input_ids": text["input_ids"], "labels": text["labels"], **spec.data.collate(items)}

    def timed(model, b, aux_only: bool) -> float:
        model.aux_only = aux_only
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = model(**b)
            (out.loss_sum if out.aux_sum is None else out.loss_sum + out.aux_sum).backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first is warm-up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    m80, m160 = build("small_whisper"), build("small_whisper_160ms")
    rows = {
        "lm_80ms_live": timed(m80, batch(m80, False), False),
        "lm_160ms_live": timed(m160, batch(m160, False), False),
        "lm_160ms_cached": timed(m160, batch(m160, True), False),
        "ctc_phase_live": timed(m160, batch(m160, False), True),
        "ctc_phase_cached": timed(m160, batch(m160, True), True),
    }
    print(
        f"\none speech training step, {args.clips} clips, forward + backward (median of {args.repeats}), "
        f"{torch.get_num_threads()} threads"
    )
    for k, v in rows.items():
        print(f"  {k:<18} {v:7.3f} s")
    res = {
        **{f"{k}_s": round(v, 4) for k, v in rows.items()},
        "rows_160_vs_80": round(rows["lm_160ms_live"] / rows["lm_80ms_live"], 3),
        "cached_vs_live_lm": round(rows["lm_160ms_cached"] / rows["lm_160ms_live"], 3),
        "cached_vs_live_ctc": round(rows["ctc_phase_cached"] / rows["ctc_phase_live"], 3),
        "ctc_phase_vs_lm": round(rows["ctc_phase_cached"] / rows["lm_160ms_cached"], 3),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
