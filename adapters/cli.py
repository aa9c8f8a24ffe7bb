"""`mm-llama caption` / `mm-llama asr`: one tower, any adapters, any media they handle.

    mm-llama caption --model TOWER --adapter IMAGE.safetensors --adapter VIDEO.safetensors --adapter SPEECH.safetensors
                     photo.jpg clip.mp4 talk.wav
    mm-llama caption --model Llama-3.2-11B-Vision/ photo.jpg      (an HF/Meta Mllama folder: its own image adapter)

`--adapter` may be given any number of times, in any order (each file's kind is read from its metadata); the
adapters are composed on one tower (adapters/composed.py). Images and videos get captions, audio gets transcripts;
one line per input, `PATH: TEXT`. The two commands differ only in their defaults (asr: a longer output).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.data.badsamples import SampleError
from mm_llama.llama import Tokenizer, load_source
from mm_llama.llama.checkpoint import CheckpointError
from mm_llama.llama.quantize import quantize_int8
from mm_llama.options import RANGES

from .describe import check_handled, describe, handled_kind
from .files import adapter_kind, load_composed, trained_tower_dtype
from .hf_mllama import is_mllama_folder, load_pretrained


def load_model(args):
    """(ComposedModel, Tokenizer) from --model and the --adapter files: the tower in --dtype (auto: the dtype the
    adapters were trained on), the parts in fp32; answers compute as training did (ComposedModel.compute_context)."""
    args.model = resolve(args.model)  # a path, or asset:NAME, e.g. asset:smollm2_gguf
    args.tokenizer = resolve(args.tokenizer) if args.tokenizer else None
    files = list(args.adapter or []) + [f for f in (getattr(args, "video_adapter", None),) if f]
    if args.dtype == "auto":  # the tower the adapters were trained on: an fp32 tower is not a bf16-trained one's
        args.dtype = trained_tower_dtype(files) if files else "float32"
    dtype = getattr(torch, args.dtype)
    quantize = getattr(args, "quantize", None)
    if files:
        model = load_composed(load_source(args.model, dtype=dtype, device=args.device, quantize=quantize), files)
    elif is_mllama_folder(args.model) or (Path(args.model) / "params.json").is_file():
        try:
            model = load_pretrained(args.model, dtype=dtype, device=args.device)
        except CheckpointError as e:  # e.g. a plain tower folder: say what to add
            raise ValueError(f"{e}; a plain tower needs --adapter FILE (image, video or speech adapter)") from None
        model.part("image").float()  # parts compute in fp32, as everywhere
        if quantize:
            quantize_int8(model.tower, dtype)
    else:
        raise ValueError(f"{args.model}: a plain tower needs --adapter FILE (image, video or speech adapter)")
    if args.tokenizer is None and args.model.startswith("preset:"):
        raise ValueError(f"{args.model} is a random tower: give --tokenizer")
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    return model, tok


def check_inputs(args, inputs) -> None:
    """Before any model loads: every input exists and is a kind the adapter files (or an Mllama folder: images)
    will read; a ValueError naming the file otherwise."""
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)}")
    files = list(args.adapter or []) + [f for f in (getattr(args, "video_adapter", None),) if f]
    kinds = {adapter_kind(f) for f in files} if files else {"image"}
    for path in inputs:
        handled_kind(path, sorted(kinds), "given")


def cmd_describe(args) -> int:
    check_inputs(args, args.inputs)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    print(
        f"[loaded {'+'.join(model.modalities)} adapters on a {args.dtype} tower in {time.perf_counter() - t0:.1f} s]",
        file=sys.stderr,
    )
    for path in args.inputs:
        check_handled(model, path)  # every input is handled before any work starts (ValueError -> exit 2)
    failed = 0
    for path in args.inputs:
        t0 = time.perf_counter()
        try:
            answer = describe(
                model,
                tok,
                path,
                Path(path).read_bytes(),
                prompt=args.prompt,
                frames=args.frames,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                language=args.language,
            )
        except SampleError as e:
            print(f"mm-llama {args.command}: {e}", file=sys.stderr)
            failed += 1
            continue
        dt = time.perf_counter() - t0
        print(f"{path}: {' '.join(answer.text.split())}", flush=True)  # one line per input, whatever the text
        rtf = f", real-time factor {dt / answer.media_seconds:.2f}" if answer.media_seconds else ""
        print(f"[{answer.kind}: {dt:.2f} s{rtf}]", file=sys.stderr)
    return 2 if failed else 0


def _add_common(c, max_new_tokens: int) -> None:
    c.add_argument("--model", required=True, help="the Llama tower (Meta dir | HF dir | .gguf), or an Mllama folder")
    c.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="adapter file (image, video or speech; kind read from the file); repeat for several",
    )
    c.add_argument("--tokenizer", default=None)
    c.add_argument("inputs", nargs="+", metavar="FILE", help="images, videos and audio files")
    c.add_argument("--prompt", default="", help="text after the image/video token")
    c.add_argument("--language", default="English", help="speech: the language named in the ASR prompt")
    c.add_argument("--frames", type=RANGES["frames"], default=8, help="frames sampled uniformly from a video")
    c.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=max_new_tokens)
    c.add_argument("--temperature", type=RANGES["temperature"], default=0.0)
    c.add_argument("--top-p", type=RANGES["top_p"], default=1.0)
    c.add_argument("--seed", type=RANGES["seed"], default=None)
    c.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the tower's weights; auto: the dtype the adapters were trained with (recorded in each "
        "file; float32 for older files and Mllama folders)",
    )
    c.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 weight-only tower linears (pair with --dtype bfloat16; inference only)",
    )
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_describe)


def add_parser(sub) -> None:
    c = sub.add_parser("caption", help="caption images and videos (and transcribe audio) with a tower + adapters")
    _add_common(c, max_new_tokens=32)
    c.add_argument("--video-adapter", default=None, help="same as another --adapter (kept for old scripts)")


def add_asr_parser(sub) -> None:
    a = sub.add_parser("asr", help="transcribe audio (and caption images and videos) with a tower + adapters")
    _add_common(a, max_new_tokens=96)
