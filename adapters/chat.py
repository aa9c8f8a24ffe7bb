"""`mm-llama ask` and `mm-llama chat`: answer a conversation whose user turns hold any mixture of media.

    mm-llama ask --adapter image.safetensors --adapter speech.safetensors photo.jpg question.wav --prompt "Answer:"
    mm-llama chat --adapter image.safetensors          (interactive: /attach FILE, /reset, /quit)

`ask` answers ONE user turn holding the files in the order given, then the prompt text (after an optional system
message), and prints the answer alone on its last stdout line. `--model` defaults to the tower the adapter files
record (the training run's `tower.path`, an asset, or its random preset), when it can be found. The conversation is
rendered with the tower's chat format, laid out as training lays out conversation samples (adapters/samples.py),
and answered through the one composed forward (adapters/generation.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from mm_llama.assets import resolve
from mm_llama.data.badsamples import SampleError
from mm_llama.data.conversation import Message, Part
from mm_llama.generate import StreamPrinter
from mm_llama.options import RANGES

from .cli import check_inputs, load_model
from .describe import check_handled
from .files import read_adapter_meta
from .generation import generate_items
from .modality import AnswerOptions
from .registry import MODALITIES
from .samples import SampleOptions, Samples

TextSink = Callable[[str], object]  # receives an answer's text, chunk by chunk, as it is decoded


def recorded_source(files: list[str], key: str) -> str | None:
    """The tower (or tokenizer) the adapter files record, if they agree and it can be found here."""
    found = {(read_adapter_meta(f).get("sources") or {}).get(key) for f in files}
    found.discard(None)
    if len(found) > 1:
        raise ValueError(f"the adapter files record different {key}s ({', '.join(sorted(found))}): give --model")
    if not found:
        return None
    source = found.pop()
    if source.startswith("preset:"):
        return source
    try:
        path = resolve(source)
    except (KeyError, FileNotFoundError, ValueError):
        return None
    return str(path) if Path(path).exists() else None


def fill_model(args) -> None:
    """--model / --tokenizer from the adapter files when not given (a clear error when they cannot be found)."""
    if args.model is None:
        if not args.adapter:
            raise ValueError("give --model (the tower) or --adapter files that record it")
        args.model = recorded_source(args.adapter, "tower")
        if args.model is None:
            raise ValueError("the adapter files record no tower that is on this machine: give --model")
    if args.tokenizer is None and args.model.startswith("preset:"):
        args.tokenizer = recorded_source(args.adapter, "tokenizer")
        if args.tokenizer is None:
            raise ValueError("a random preset tower needs --tokenizer (the adapter files record none found here)")


def media_part(model, samples: Samples, path: str) -> Part:
    """A file as a conversation part, decoded by its modality's maker (errors name the file)."""
    return media_value(model, samples, Path(path).name, Path(path).read_bytes(), where=path)


def media_value(model, samples: Samples, name: str, data: bytes, where: str = "") -> Part:
    """A file's bytes as a conversation part: its kind from `name`'s extension, decoded by the kind's maker (errors
    name `where`, default `name`)."""
    where = where or name
    kind = check_handled(model, where)
    ext = name.rsplit(".", 1)[-1].lower()
    value = samples.makers[kind].decode(data, where, ext)
    return Part(MODALITIES[kind].data.medium.name, ref=value, name=name)


def samples_for(model, tok, args) -> Samples:
    """The one sample maker of a session: decodes the files and lays the conversation out."""
    return Samples.of(model, tok, options=SampleOptions(template=args.template), answer=options(args))


def answer(model, tok, samples: Samples, messages: list[Message], args, on_text: TextSink | None = None) -> str:
    """The answer to a conversation ending with a user turn; `on_text(chunk)` receives the text as it is decoded."""
    return answer_request(model, tok, samples.request(messages), args, on_text)


def answer_request(model, tok, request: dict, args, on_text: TextSink | None = None) -> str:
    """The answer to a laid-out request (`Samples.request`), streamed to `on_text` when given; the returned answer
    has its whitespace runs joined to single spaces."""
    (text,) = generate_items(
        model,
        tok,
        [request],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_token=StreamPrinter(tok, on_text) if on_text is not None else None,
    )
    return one_line(text)


def one_line(text: str) -> str:
    """An answer as `mm-llama ask` prints it: its whitespace runs joined to single spaces."""
    return " ".join(text.split())


class OneLineStream:
    """Text chunks as they are decoded -> `write`: what `one_line` of the text so far adds to what was written, so
    the streamed line equals the printed one (`one_line` of a prefix is a prefix of `one_line` of the whole)."""

    def __init__(self, write: TextSink):
        self.write, self.text, self.shown = write, "", 0

    def __call__(self, chunk: str) -> None:
        self.text += chunk
        line = one_line(self.text)
        if len(line) > self.shown:
            self.write(line[self.shown :])
            self.shown = len(line)


def options(args) -> AnswerOptions:
    return AnswerOptions(prompt=args.prompt or "", frames=args.frames, language=args.language)


def cmd_ask(args) -> int:
    check_inputs(args, args.inputs)
    fill_model(args)
    model, tok = load_model(args)
    samples = samples_for(model, tok, args)
    try:
        messages = ask_messages(model, samples, args.inputs, args.prompt, args.system)
    except SampleError as e:
        print(f"mm-llama ask: {e}", file=sys.stderr)
        return 2
    if messages is None:
        print("mm-llama ask: error: nothing to ask: give files and/or --prompt", file=sys.stderr)
        return 2
    print(answer(model, tok, samples, messages, args), flush=True)
    return 0


def ask_messages(model, samples: Samples, files: list[str], prompt: str = "", system: str | None = None):
    """The conversation `mm-llama ask FILES --prompt PROMPT` answers: one user turn holding the files in order, then
    the prompt (after the system message, if any); None when there is nothing to ask. The demo's dialogue figures
    are scored through this too."""
    parts = [media_part(model, samples, p) for p in files]
    if prompt:
        parts.append(Part("text", prompt))
    if not parts:
        return None
    return ([Message("system", [Part("text", system)])] if system else []) + [user_turn(parts)]


MEDIA_GAP = "\n"


def user_turn(parts: list[Part]) -> Message:
    """A user turn of these parts, with a line break between media that would stand side by side. Under Llama 3.2
    Vision's cross-attention rule a run of adjacent images is seen as one group by all the text after it, in no
    order, so "the first or the second picture?" could not be told apart; with text between them, that text sees
    the first image alone and the text after the second sees the second (the tower's self-attention carries both
    on). `mm-llama ask`, `mm-llama chat`, the chat page and the demo's dialogue make their user turns here."""
    out: list[Part] = []
    for p in parts:
        if out and p.kind != "text" and out[-1].kind != "text":
            out.append(Part("text", MEDIA_GAP))
        out.append(p)
    return Message("user", out)


def cmd_chat(args) -> int:
    fill_model(args)
    model, tok = load_model(args)
    samples = samples_for(model, tok, args)
    history = [Message("system", [Part("text", args.system)])] if args.system else []
    pending: list[Part] = []
    print("[chat: /attach FILE to add a file to your next message, /reset, /quit]", file=sys.stderr)
    stream = sys.stdout.isatty()
    for line in sys.stdin:
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, pending = history[:1] if args.system else [], []
            continue
        if line.startswith("/attach "):
            try:
                pending.append(media_part(model, samples, line.removeprefix("/attach ").strip()))
            except (SampleError, ValueError, OSError) as e:
                print(f"[{e}]", file=sys.stderr)
            continue
        if not line and not pending:
            continue
        history.append(user_turn([*pending, *([Part("text", line)] if line else [])]))
        pending = []
        if stream:  # in a terminal the answer appears as it is decoded; piped, each reply is one whole line
            reply = answer(model, tok, samples, history, args, OneLineStream(_write_now))
            print(flush=True)
        else:
            reply = answer(model, tok, samples, history, args)
            print(reply, flush=True)
        history.append(Message("assistant", [Part("text", reply)]))
    return 0


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the tower (default: the one the adapter files record)")
    p.add_argument("--adapter", action="append", default=[], help="adapter file; repeat for several")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--template", default="auto", choices=["auto", "llama3", "chatml", "plain"])
    p.add_argument("--language", default="English")
    p.add_argument("--frames", type=RANGES["frames"], default=8)
    p.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=64)
    p.add_argument("--temperature", type=RANGES["temperature"], default=0.0)
    p.add_argument("--top-p", type=RANGES["top_p"], default=1.0)
    p.add_argument("--seed", type=RANGES["seed"], default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--device", default="cpu")


def add_parsers(sub) -> None:
    a = sub.add_parser("ask", help="answer one user turn: the files in order, then --prompt (the answer: last line)")
    a.add_argument("inputs", nargs="*", metavar="FILE", help="images, videos, audio: in the order they stand")
    a.add_argument("--prompt", default="", help="text after the files")
    _add_common(a)
    a.set_defaults(func=cmd_ask)
    c = sub.add_parser("chat", help="an interactive conversation (/attach FILE, /reset, /quit)")
    c.add_argument("--prompt", default="", help=argparse.SUPPRESS)
    _add_common(c)
    c.set_defaults(func=cmd_chat)
