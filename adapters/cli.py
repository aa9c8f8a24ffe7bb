"""`mm-llama caption`: caption images with a Llama 3.2 Vision folder, or a plain tower + a trained adapter."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def cmd_caption(args) -> int:
    import torch

    from data.image import decode_image
    from mm_llama.generate import StreamPrinter
    from mm_llama.llama import Tokenizer
    from mm_llama.llama import load_pretrained as load_tower

    from .checkpoint import load_adapter, load_pretrained
    from .inference import caption

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.adapter:
        model = load_adapter(load_tower(args.model, dtype=dtype, device=args.device), args.adapter)
    else:
        model = load_pretrained(args.model, dtype=dtype, device=args.device)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    video_model = None
    if args.video_adapter:
        from .video import load_video_adapter

        video_model = load_video_adapter(model, args.video_adapter)
    print(f"[loaded in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    from data.video import VIDEO_EXTS

    for path in args.images:
        is_video = Path(path).suffix.lower().lstrip(".") in VIDEO_EXTS
        if is_video and video_model is None:
            print(f"{path}: a video needs --video-adapter", file=sys.stderr)
            return 2
        sys.stdout.write(f"{path}: ")
        sys.stdout.flush()
        printer = StreamPrinter(tok, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        data = Path(path).read_bytes()
        if is_video:
            from data.image import normalize_tiles
            from data.video import decode_video

            from .inference import caption_video

            size = model.vision_encoder.args.image_size
            frames = normalize_tiles(decode_video(data, str(path), num_frames=args.frames, size=size))
            caption_video(video_model, tok, frames, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, on_token=printer)  # fmt: skip
        else:
            caption(model, tok, [decode_image(data, str(path))], args.prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=printer)  # fmt: skip
        sys.stdout.write("\n")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("caption", help="caption images (Mllama folder, or a tower + --adapter)")
    c.add_argument("--model", required=True, help="HF Mllama folder, or a Llama tower when --adapter is given")
    c.add_argument("--adapter", default=None, help="image adapter checkpoint (safetensors) from training")
    c.add_argument("--tokenizer", default=None)
    c.add_argument("--video-adapter", default=None, help="video adapter checkpoint (aggregator + video blocks)")
    c.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from a video")
    c.add_argument("images", nargs="+", help="image or video files")
    c.add_argument("--prompt", default="", help="text after the image token(s)")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_caption)


def cmd_asr(args) -> int:
    import torch

    from data.audio import decode_audio
    from mm_llama.llama import Tokenizer
    from mm_llama.llama import load_pretrained as load_tower

    from .asr import load_speech_adapter, transcribe

    model = load_speech_adapter(load_tower(args.model, dtype=getattr(torch, args.dtype)), args.adapter)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    for path in args.audio:
        p = Path(path)
        wave = decode_audio(p.read_bytes(), str(p), p.suffix.lstrip("."))
        t0 = time.perf_counter()
        (text,) = transcribe(model, tok, [wave], language=args.language, max_new_tokens=args.max_new_tokens)
        rtf = (time.perf_counter() - t0) / (wave.numel() / 16000)
        print(f"{path}: {text}")
        print(f"[real-time factor {rtf:.2f}]", file=sys.stderr)
    return 0


def add_asr_parser(sub) -> None:
    a = sub.add_parser("asr", help="transcribe audio files with a tower + a trained speech adapter")
    a.add_argument("--model", required=True, help="the Llama tower (Meta dir | HF dir | .gguf)")
    a.add_argument("--adapter", required=True, help="speech adapter checkpoint (safetensors)")
    a.add_argument("--tokenizer", default=None)
    a.add_argument("audio", nargs="+", help="any common audio format, any rate, mono or stereo")
    a.add_argument("--language", default="English")
    a.add_argument("--max-new-tokens", type=int, default=96)
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.set_defaults(func=cmd_asr)
