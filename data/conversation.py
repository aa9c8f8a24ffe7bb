"""Conversations: the one sample shape training and answering use. A conversation is a list of messages (`system`,
`user`, `assistant`) whose content is text and media parts of any registered medium, any number of each, at any
position, in any turn. A caption or transcript sample is a one-turn conversation (its plug-in says how the user
turn looks: the medium and the prompt, in its order).

Rendering turns a conversation into token ids with a template:

  plain    the layout the caption/transcript recipes have always trained on: [BOS] + the user turn's parts, then
           each assistant turn as ` TEXT` + EOS (no headers)
  llama3   Llama 3 headers: <|begin_of_text|> <|start_header_id|>ROLE<|end_header_id|>\\n\\n CONTENT <|eot_id|> ...
  chatml   <|im_start|>ROLE\\n CONTENT <|im_end|>\\n ...
  auto     the tokenizer's own chat format for conversations, `plain` for caption/transcript samples

A medium part becomes the ids its plug-in splices in (image: one `<|image|>`, as Llama 3.2 Vision; video: one
`<|video|>`; speech: one `<|speech|>` per adapter row) and a payload the plug-in's collate reads. Labels follow
`train_on`: `assistant` (default: every assistant turn's content + its end-of-turn token), `last` (the last assistant
turn only) or `all` (every token but the media placeholders). Text inside a turn is stripped at the turn's ends
under the Llama 3 template (as its chat template trims; ChatML keeps text as written), and every text piece is
tokenized on its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from .badsamples import SampleError
from .collate import IGNORE_INDEX
from .media import MEDIA

CHAT_MEMBER = "chat.json"  # a conversation sample's tar member: its messages, media parts naming the other members
ROLES = ("system", "user", "assistant")
TEMPLATES = ("auto", "plain", "llama3", "chatml")
TRAIN_ON = ("assistant", "last", "all")


@dataclass(frozen=True)
class Part:
    """One piece of a message: text (`kind == "text"`) or a medium (`kind` a registered medium's name) whose `ref`
    says where it is (a shard member's name, a file path, bytes, or an already decoded value) and `name` how to
    show it."""

    kind: str
    text: str = ""
    ref: Any = None
    name: str = ""


@dataclass
class Message:
    role: str
    parts: list[Part] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.kind == "text")


def media_parts(messages: Iterable[Message]) -> list[Part]:
    return [p for m in messages for p in m.parts if p.kind != "text"]


# --- reading ------------------------------------------------------------------------------------------------------
def _content_parts(content, where: str, media_key: Callable[[dict, str], Any]) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", content)]
    if not isinstance(content, list):
        raise SampleError("bad_conversation", f"{where}: content must be a string or a list of parts")
    parts = []
    for j, c in enumerate(content):
        kind = c.get("type") if isinstance(c, dict) else None
        if kind == "text":
            if not isinstance(c.get("text"), str):
                raise SampleError("bad_conversation", f"{where}: part {j}: text part without a string 'text'")
            parts.append(Part("text", c["text"]))
        elif kind in MEDIA:
            ref = media_key(c, kind)
            if ref is None:
                raise SampleError("bad_conversation", f"{where}: part {j}: {kind} part names no file")
            parts.append(Part(kind, ref=ref, name=str(c.get("name") or PurePath(str(ref)).name)))
        else:
            known = ", ".join(["text", *MEDIA])
            raise SampleError("bad_conversation", f"{where}: part {j}: unknown part type {kind!r} (known: {known})")
    return parts


def parse_messages(obj, where: str, media_key: Callable[[dict, str], Any] | None = None) -> list[Message]:
    """Messages from Hugging Face chat-style JSON: `{"messages": [{"role", "content": str | [{"type": "text",
    "text"} | {"type": MEDIUM, MEDIUM | "path" | "member": ...}]}]}` (or the list itself). `media_key(part, kind)`
    picks a medium part's reference (default: the part's `member`, `path` or `MEDIUM` field). Unknown roles, part
    types and malformed messages raise a SampleError naming `where`."""
    media_key = media_key or (lambda c, kind: c.get("member") or c.get("path") or c.get(kind))
    msgs = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(msgs, list) or not msgs:
        raise SampleError("bad_conversation", f"{where}: no 'messages' list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "content" not in m:
            raise SampleError("bad_conversation", f"{where}: message {i} is not a {{role, content}} object")
        if m.get("role") not in ROLES:
            raise SampleError("unknown_role", f"{where}: message {i}: unknown role {m.get('role')!r} (known: {ROLES})")
        out.append(Message(m["role"], _content_parts(m["content"], f"{where}: message {i}", media_key)))
    if not any(m.role == "assistant" for m in out):
        raise SampleError("bad_conversation", f"{where}: no assistant message (nothing to learn)")
    return out


def decoded_messages(sample: dict, where: str, decode: Callable[[Part, bytes], Any]) -> list[Message]:
    """The messages of a conversation shard sample (its `chat.json` member), each medium part's `ref` replaced by
    `decode(part, the bytes of the member it names)`. Bad JSON, bad messages and missing members raise a
    SampleError naming `where`."""
    try:
        obj = json.loads(sample[CHAT_MEMBER])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("bad_conversation", f"{where}: {CHAT_MEMBER}: invalid JSON ({e})") from None
    messages = parse_messages(obj, where, lambda c, kind: c.get("member"))
    for m in messages:
        for j, p in enumerate(m.parts):
            if p.kind == "text":
                continue
            if p.ref not in sample:
                raise SampleError("missing_member", f"{where}: no member {p.ref!r} for a {p.kind} part")
            m.parts[j] = Part(p.kind, ref=decode(p, sample[p.ref]), name=p.name)
    return messages


def messages_json(messages: Sequence[Message]) -> list[dict]:
    """Messages back to chat-style JSON (media parts as `{"type": KIND, "member": REF, "name": NAME}`)."""

    def part(p: Part) -> dict:
        if p.kind == "text":
            return {"type": "text", "text": p.text}
        return {"type": p.kind, "member": p.ref, **({"name": p.name} if p.name and p.name != p.ref else {})}

    return [{"role": m.role, "content": [part(p) for p in m.parts]} for m in messages]


# --- rendering ----------------------------------------------------------------------------------------------------
@dataclass
class Rendered:
    """A rendered conversation: ids, labels (IGNORE_INDEX where no loss), and per id span the medium it holds."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    media: list[tuple[str, Any]] = field(default_factory=list)  # (kind, payload) in order
    spans: list[tuple[int, int, Part]] = field(default_factory=list)  # [start, end) of each medium's ids

    def add(self, ids: Sequence[int], learn: bool) -> None:
        self.input_ids += ids
        self.labels += list(ids) if learn else [IGNORE_INDEX] * len(ids)


def template_of(tok, template: str, conversation: bool) -> str:
    """The template a sample renders with: `auto` -> the tokenizer's chat format for conversations, else plain."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")
    if template != "auto":
        return template
    return tok.chat_format if conversation else "plain"


def _turn_tokens(tok, template: str):
    """(start ids of a ROLE turn, end-of-turn id, ids after the end) for a chat template."""
    if template == "llama3":
        sh, eh, eot = (tok.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        return lambda role: [sh, *tok.encode(role), eh], "\n\n", eot, []
    if template == "chatml":
        start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
        return lambda role: [start], "{role}\n", end, tok.encode("\n")
    raise ValueError(f"no chat template {template!r}")


def render(
    messages: Sequence[Message],
    tok,
    template: str,
    splice: Callable[[Part], tuple[list[int], Any]],
    *,
    train_on: str = "assistant",
    max_text_tokens: int = 0,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Token ids + labels of a conversation (`template`: plain | llama3 | chatml). `splice(part)` -> (the ids a
    medium part becomes, its payload). `max_text_tokens` (> 0) truncates each assistant turn's text.
    `add_generation_prompt`: end with an open assistant turn (answering)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}: use one of {', '.join(TRAIN_ON)}")
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    out = Rendered()

    def learn(i: int) -> bool:
        role = messages[i].role
        return train_on == "all" or role == "assistant" and (train_on == "assistant" or i == last)

    if template == "plain":
        if tok.add_bos and tok.bos_id is not None:
            out.add([tok.bos_id], train_on == "all")
        for i, m in enumerate(messages):
            if m.role == "assistant":
                ids = tok.encode(" " + m.text.strip())
                out.add((ids[:max_text_tokens] if max_text_tokens else ids) + [tok.eos_id], learn(i))
            else:
                _content(out, m.parts, tok, splice, learn(i), strip=False, prefix="")
        return out
    header, first, eot, after = _turn_tokens(tok, template)
    strip = template == "llama3"  # Llama 3's template trims each message; ChatML's keeps it as written
    bot = tok.bos_id if template == "llama3" else None
    if bot is not None:
        out.add([bot], train_on == "all")
    for i, m in enumerate(messages):
        prefix = first.format(role=m.role)
        out.add(header(m.role), train_on == "all")
        if m.role == "assistant":
            ids = tok.encode(prefix)
            out.add(ids, train_on == "all")
            text = tok.encode(m.text.strip() if strip else m.text)
            out.add((text[:max_text_tokens] if max_text_tokens else text) + [eot], learn(i))
        else:
            _content(out, m.parts, tok, splice, learn(i), strip=strip, prefix=prefix)
            out.add([eot], learn(i))
        out.add(after, train_on == "all")
    if add_generation_prompt:
        out.add(header("assistant") + tok.encode(first.format(role="assistant")), False)
    return out


def _content(out: Rendered, parts: Sequence[Part], tok, splice, learn: bool, *, strip: bool, prefix: str) -> None:
    """A non-assistant turn's parts in order: text pieces tokenized each on its own (the turn's prefix joined to the
    first text piece when the turn starts with text), media spliced (never labelled)."""
    pending = prefix
    n = len(parts)
    for j, p in enumerate(parts):
        if p.kind == "text":
            text = p.text
            if strip and all(q.kind == "text" for q in parts[:j]):
                text = text.lstrip()
            if strip and all(q.kind == "text" for q in parts[j + 1 :]):
                text = text.rstrip()
            text, pending = pending + text, ""
            if text:
                out.add(tok.encode(text), learn)
            continue
        if pending:
            out.add(tok.encode(pending), learn)
            pending = ""
        ids, payload = splice(p)
        start = len(out.input_ids)
        out.add(ids, False)
        out.media.append((p.kind, payload))
        out.spans.append((start, len(out.input_ids), p))
    if pending and n == 0:
        out.add(tok.encode(pending), learn)


def show(r: Rendered, tok) -> str:
    """A rendered sample as text, the way `mm-llama data preview` prints it: media as `<KIND:NAME>`, the tokens
    that carry loss between `[[` and `]]`."""
    starts = {start: (end, part) for start, end, part in r.spans}
    out: list[str] = []
    buf: list[int] = []
    learning = False

    def flush() -> None:
        if buf:
            out.append(tok.decode(buf))
            buf.clear()

    i = 0
    while i < len(r.input_ids):
        if i in starts:
            end, part = starts[i]
            flush()
            if learning:
                out.append("]]")
                learning = False
            out.append(f"<{part.kind}:{part.name}>")
            i = end
            continue
        learn = r.labels[i] != IGNORE_INDEX
        if learn != learning:
            flush()
            out.append("[[" if learn else "]]")
            learning = learn
        buf.append(r.input_ids[i])
        i += 1
    flush()
    if learning:
        out.append("]]")
    return "".join(out)
