"""Evaluate a trained adapter on webdataset shards, batched, on one or many ranks.

    python -m recipes.evaluate --config recipes/configs/debug_image.yaml --checkpoint RUN/checkpoints/step_N \
        --data tests/assets/shards/image/index.json [--max-new-tokens 24] [key=value ...]

The modality's plug-in answers and scores (adapters/modalities/): captions (image, video) get corpus BLEU
(sacrebleu), CIDEr (pycocoevalcap) and exact match after normalisation; speech gets WER and CER (jiwer). Samples
without the modality's media (or text) are left out of both references and answers and counted. Ranks split the
shards; results are gathered on rank 0, which prints one JSON line and writes RUN/eval.json. The tower is put in
the training config's `dtype` (as recipes/train.py puts it), so a bf16-trained adapter is read on its bf16 tower.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mm_llama.adapters.registry import get_modality
from mm_llama.assets import resolve
from mm_llama.config import ConfigError
from mm_llama.data.shards import expand_urls, read_samples
from mm_llama.engine import init_distributed
from mm_llama.engine.checkpoint import load_checkpoint
from mm_llama.engine.parallelize import weight_dtype
from mm_llama.engine.trainer import load_trained_weights
from mm_llama.llama import Tokenizer
from mm_llama.llama.checkpoint import CheckpointError
from mm_llama.options import RANGES, Parser

from .train import load_train_config, model_for
from .train_eval import answer_pairs, gather, scores


def main(argv=None, prog: str | None = None) -> int:
    """Exit 0 with the scores; 2 with one line naming the config key, checkpoint or file that is wrong."""
    try:
        return evaluate(argv, prog)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"{prog or 'evaluate'}: error: {e}", file=sys.stderr)
        return 2


def evaluate(argv=None, prog: str | None = None) -> int:
    # long: one evaluation reads top to bottom: config, model, checkpoint, shards, answers, scores, the report
    ap = Parser(prog=prog)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=32)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    spec = get_modality(cfg.model.modality)
    info = init_distributed(device="cpu" if not torch.cuda.is_available() else None)
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    # the tower it was trained with: its weights in the training dtype (bf16 under bf16 autocast where the recipe
    # trained that way), the trained part in fp32; an fp32 tower is not the model a bf16-trained adapter learnt on
    dt = weight_dtype(cfg.dtype, info.device)
    model = model_for(cfg, dt).to(info.device)
    weights, _, _ = load_checkpoint(args.checkpoint, 0)
    load_trained_weights(model, weights, args.checkpoint)
    model.eval()
    urls = expand_urls(args.data)[info.rank :: info.world_size]
    # samples without this modality's media are left out of references AND hypotheses, counted
    samples = read_samples(urls, args.limit)
    mine = answer_pairs(
        model, tok, cfg, spec.name, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    everyone = gather(mine, info)
    pairs = [p for part, _ in everyone for p in part]
    skipped = sum(n for _, n in everyone)
    if info.is_main:
        result = scores(spec.name, pairs) | {
            "skipped_samples": skipped,
            "tower_dtype": str(dt).removeprefix("torch."),
        }
        result["examples"] = [{"ref": a, "hyp": b} for a, b in pairs[:5]]
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(result, indent=1))
        print("EVAL " + json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
