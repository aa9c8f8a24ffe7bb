"""Evaluate a trained adapter on webdataset shards, batched, on one or many ranks.

    python -m recipes.evaluate --config recipes/configs/debug_image.yaml --checkpoint RUN/checkpoints/step_N \
        --data tests/assets/shards/image/index.json [--max-new-tokens 24] [key=value ...]

Captioning: corpus BLEU (sacrebleu), CIDEr (pycocoevalcap) and exact match after normalisation. Speech: WER and
CER (jiwer) after normalisation. Ranks split the shards; results are gathered on rank 0, which prints one JSON
line and writes RUN/eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.config import load_config
from recipes.train import TrainConfig, build_model, build_tower


def caption_metrics(refs: list[str], hyps: list[str]) -> dict:
    import sacrebleu
    from mm_llama.adapters.asr import normalize_text
    from pycocoevalcap.cider.cider import Cider

    r_norm, h_norm = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    bleu = sacrebleu.corpus_bleu(h_norm, [r_norm])
    exact = sum(r == h for r, h in zip(r_norm, h_norm)) / max(len(refs), 1)
    gts = {i: [r] for i, r in enumerate(r_norm)}
    res = {i: [h or "<empty>"] for i, h in enumerate(h_norm)}
    cider = Cider().compute_score(gts, res)[0] if refs else 0.0
    return {"bleu": bleu.score, "cider": float(cider), "exact_match": exact, "n": len(refs)}


def main(argv=None) -> int:
    import torch.distributed as dist
    from mm_llama.adapters.asr import transcribe, wer_cer
    from mm_llama.adapters.inference import caption
    from mm_llama.data.audio import decode_audio
    from mm_llama.data.image import IMAGE_EXTS, decode_image
    from mm_llama.data.shards import expand_urls, read_samples

    from mm_llama.engine import init_distributed
    from mm_llama.engine.checkpoint import load_checkpoint
    from mm_llama.llama import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    info = init_distributed(device="cpu" if not torch.cuda.is_available() else None)
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    model = build_model(cfg, build_tower(cfg)).to(info.device)
    weights, _, _ = load_checkpoint(args.checkpoint, 0)
    model.load_state_dict(weights, strict=False)
    model.eval()
    urls = expand_urls(args.data)[info.rank :: info.world_size]
    samples = read_samples(urls, args.limit)
    refs, hyps = [], []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i : i + args.batch_size]
        refs += [s["txt"].decode().strip() for s in chunk]
        if cfg.model.modality == "image":
            imgs = [decode_image(s[next(e for e in IMAGE_EXTS if e in s)]) for s in chunk]
            hyps += caption(model, tok, imgs, cfg.data.prompt, max_new_tokens=args.max_new_tokens)
        else:
            waves = [decode_audio(s[e], s["__key__"], e) for s in chunk for e in ("flac", "wav", "mp3") if e in s]
            hyps += transcribe(model, tok, waves, max_new_tokens=args.max_new_tokens)
    pairs = list(zip(refs, hyps))
    if info.distributed:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    if info.is_main:
        r, h = [p[0] for p in pairs], [p[1] for p in pairs]
        result = caption_metrics(r, h) if cfg.model.modality == "image" else wer_cer(r, h)
        result["examples"] = [{"ref": a, "hyp": b} for a, b in pairs[:5]]
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(result, indent=1))
        print("EVAL " + json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
