"""`mm-llama` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json as _json
import sys
import time
from pathlib import Path

import torch

import mm_llama
from mm_llama.adapters.chat import add_parsers as add_chat_parsers
from mm_llama.adapters.cli import add_asr_parser
from mm_llama.adapters.cli import add_parser as add_caption
from mm_llama.adapters.modalities.speech import cache_encoder_outputs, load_encoder
from mm_llama.adapters.serve import add_serve_parser
from mm_llama.data.shards import expand_urls, verify_shards
from mm_llama.data.sources import FORMATS, read_source
from mm_llama.data.writer import write_shards
from mm_llama.options import RANGES, Parser
from mm_llama.recipes import catalog

from .assets import asset_path
from .config import ConfigError
from .generate import StreamPrinter, generate
from .llama import Tokenizer, load_pretrained

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, DTYPES[name])


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=64)
    p.add_argument("--temperature", type=RANGES["temperature"], default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=RANGES["top_p"], default=1.0)
    p.add_argument("--top-k", type=RANGES["top_k"], default=0)
    p.add_argument("--seed", type=RANGES["seed"], default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 weight-only tower linears (pair with --dtype bf16; inference only)",
    )
    p.add_argument("--device", default="cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_pretrained(args.model, dtype=_dtype(args.dtype), device=args.device, quantize=args.quantize)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    for prompt in args.prompt:
        if not args.chat:
            sys.stdout.write(prompt)
        else:
            sys.stdout.write(f"> {prompt}\n")
        sys.stdout.flush()
        printer = StreamPrinter(tok, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        t0 = time.perf_counter()
        generate(
            model,
            tok,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            chat=args.chat,
            on_token=printer,
        )
        dt = time.perf_counter() - t0
        sys.stdout.write("\n")
        print(f"[{len(printer.ids)} tokens in {dt:.2f} s, {len(printer.ids) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


DEMO_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


def cmd_demo(args: argparse.Namespace) -> int:
    """The real SmolLM2-135M tower answering prompts (the multimodal demo is `python -m recipes.demo`)."""

    path = asset_path("smollm2_gguf")
    t0 = time.perf_counter()
    model = load_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    a = model.args
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {path.name} through mm_llama in {time.perf_counter() - t0:.1f} s")
    print(
        f"  {a.n_layers} layers, d={a.dim}, {a.n_heads}/{a.n_kv_heads} heads, vocab {a.vocab_size}, {n_params:,} params"
    )
    print("raw completion:\n  The capital of France is", end="", flush=True)
    printer = StreamPrinter(tok, lambda s: print(s, end="", flush=True))
    generate(model, tok, ["The capital of France is"], max_new_tokens=16, on_token=printer)
    print()
    for prompt in args.prompt or DEMO_PROMPTS:
        print(f"\nuser> {prompt}\nassistant> ", end="", flush=True)
        printer = StreamPrinter(tok, lambda s: print(s, end="", flush=True))
        t1 = time.perf_counter()
        generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, chat=True, on_token=printer)
        dt = time.perf_counter() - t1
        print(f"\n  [{len(printer.ids)} tokens, {len(printer.ids) / dt:.1f} tok/s]")
    return 0


def cmd_shards_write(args: argparse.Namespace) -> int:
    samples = read_source(args.source_format, args.input, args.media_root)
    rep = write_shards(
        samples,
        args.out,
        prefix=args.prefix,
        maxcount=args.maxcount,
        maxsize=args.maxsize_mb * 1e6,
        progress=not args.quiet,
        replace=args.replace,
    )
    summary = {
        "written": rep.written,
        "skipped": rep.skipped,
        "reasons": dict(rep.reasons),
        "shards": len(rep.shards),
        "index": str(Path(args.out) / "index.json") if rep.written else None,
        "samples_per_s": round(rep.written / max(rep.seconds, 1e-9), 1),
    }
    print(_json.dumps(summary))
    for e in rep.first_errors:
        print(f"skipped: {e}", file=sys.stderr)
    if not rep.written:
        why = f"all {rep.skipped} samples skipped (above)" if rep.skipped else f"{args.input} holds no sample"
        print(f"mm-llama shards write: error: nothing written: {why}; no shard or index left", file=sys.stderr)
        return 1
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    urls = expand_urls(args.urls, allow_pipe=args.allow_pipe)
    rep = verify_shards(urls, allow_pipe=args.allow_pipe, options={"video": {"num_frames": args.video_frames}})
    print(_json.dumps(rep.summary()))
    for e in rep.examples[:20]:
        print(f"bad: {e}", file=sys.stderr)
    return 1 if rep.bad else 0


def cmd_shards_encode(args: argparse.Namespace) -> int:
    rep = cache_encoder_outputs(load_encoder(args.encoder), args.encoder, args.index, args.out, replace=args.replace)
    print(
        _json.dumps(
            {
                "written": rep.written,
                "not_cached": rep.reasons["not_cached"],
                "shards": len(rep.shards),
                "seconds": round(rep.seconds, 1),
                "index": f"{args.out}/index.json",
            }
        )
    )
    return 0


def _add_shards(sub: argparse._SubParsersAction[Parser]) -> None:
    sh = sub.add_parser("shards", help="write or verify webdataset shards")
    shsub = sh.add_subparsers(dest="shards_command", required=True)
    w = shsub.add_parser("write", help="your data (manifest, chat messages, LLaVA, COCO, LibriSpeech) -> shards")
    w.add_argument("input", help="the source: a file or folder in the --from format")
    w.add_argument(
        "--from",
        dest="source_format",
        choices=FORMATS,
        default="manifest",
        help="manifest: JSONL {image|video|audio: path, text} or a folder of NAME.EXT + NAME.txt; messages: JSONL "
        "chat messages with media parts; llava: LLaVA JSON; coco: COCO captions JSON; librispeech: its folders",
    )
    w.add_argument("--media-root", default=None, help="relative media paths resolve here (default: beside SRC)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--maxcount", type=RANGES["count"], default=1000, help="samples per shard at most")
    w.add_argument("--maxsize-mb", type=RANGES["size_mb"], default=512, help="shard size limit (MB)")
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--replace", action="store_true", help="remove the shards and index already in --out first")
    w.set_defaults(func=cmd_shards_write)
    v = shsub.add_parser("verify", help="decode every sample; JSON summary; exit 1 when anything is bad")
    v.add_argument("urls", nargs="+", help="shard paths, brace patterns, globs or an index.json")
    v.add_argument("--allow-pipe", action="store_true", help="accept pipe: URLs (runs shell commands)")
    v.add_argument("--video-frames", type=RANGES["frames"], default=1)
    v.set_defaults(func=cmd_shards_verify)
    e = shsub.add_parser("encode", help="copy speech shards with each clip's frozen-encoder output cached (enc.npy)")
    e.add_argument("index", help="the speech shards' index.json")
    e.add_argument("--encoder", required=True, help="the training config's model.speech.encoder (whisper:PATH)")
    e.add_argument("--out", required=True, help="output folder (train with data.train=OUT/index.json)")
    e.add_argument("--replace", action="store_true", help="remove the shards and index already in --out first")
    e.set_defaults(func=cmd_shards_encode)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mm-llama", description=__doc__)
    p.add_argument("--version", action="version", version=f"mm-llama {mm_llama.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion from a Llama 3 tower (Meta dir | HF dir | .gguf)")
    g.add_argument("--model", required=True)
    g.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the model path)")
    g.add_argument("--prompt", action="append", required=True, help="may be given several times")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tower's chat format")
    _add_sampling(g)
    g.set_defaults(func=cmd_generate)

    _add_shards(sub)
    add_caption(sub)
    add_asr_parser(sub)
    add_serve_parser(sub)
    add_chat_parsers(sub)

    recipes = {
        "train": "train an adapter (or several): mm-llama train --config NAME|PATH [key=value ...]",
        "evaluate": "evaluate a checkpoint or adapter file on held-out shards (--help for more)",
        "plan": "memory per GPU of a training config and the parallel.* layout that fits "
        "(mm-llama plan --config C --gpus N --gpu-mem GB; --help for more)",
    }
    for name, text in recipes.items():  # the recipe parses its own options (main() hands them over)
        sub.add_parser(name, add_help=False, help=text).add_argument("args", nargs=argparse.REMAINDER)
    cf = sub.add_parser("configs", help="the shipped training configs (mm-llama configs copy NAME DEST: one to edit)")
    cfsub = cf.add_subparsers(dest="configs_command")
    cp = cfsub.add_parser("copy", help="copy a shipped config to edit (an existing file is never overwritten)")
    cp.add_argument("name", help="a shipped config's name (mm-llama configs lists them)")
    cp.add_argument("dest", help="a file or a folder")
    cf.set_defaults(func=cmd_configs)

    da = sub.add_parser("data", help="look at training data")
    dasub = da.add_subparsers(dest="data_command", required=True)
    pv = dasub.add_parser(
        "preview",
        add_help=False,
        help="the first N training samples of a config as the tower sees them, loss-bearing tokens in [[ ]] "
        "(mm-llama data preview --config C [--n N]; --help for more)",
    )
    pv.add_argument("args", nargs=argparse.REMAINDER)

    d = sub.add_parser(
        "demo",
        help="streamed text generation with the embedded SmolLM2 tower (`make demo` runs the "
        "multimodal demo, python -m recipes.demo)",
    )
    d.add_argument("--prompt", action="append", default=None)
    d.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=48)
    d.set_defaults(func=cmd_demo)
    return p


# commands whose options are a recipe's own (its parser, its --help): argv prefix -> recipe module
RECIPES = {("train",): "train", ("evaluate",): "evaluate", ("plan",): "plan", ("data", "preview"): "preview"}


def run_recipe(module: str, argv: list[str], prog: str) -> int:
    """A recipe's `main(argv)` (installed with the package as mm_llama.recipes.MODULE)."""
    main_fn = importlib.import_module(f"mm_llama.recipes.{module}").main
    return main_fn(argv, prog=prog) if "prog" in inspect.signature(main_fn).parameters else main_fn(argv)


def cmd_configs(args: argparse.Namespace) -> int:
    if args.configs_command == "copy":
        print(f"{catalog.copy(args.name, args.dest)}")
        return 0
    names = catalog.shipped()
    width = max(map(len, names))
    for name, path in names.items():
        desc = catalog.describe(path)
        print(f"{name:<{width}}  {desc[:110] + ('...' if len(desc) > 110 else '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for prefix, module in RECIPES.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return run_recipe(module, argv[len(prefix) :], prog="mm-llama " + " ".join(prefix))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"mm-llama {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
