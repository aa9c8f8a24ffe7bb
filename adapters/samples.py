"""Training items and generation requests from conversations (data/conversation.py), for any mixture of the
registered media: the one place samples are laid out. Each plug-in declares how its medium is decoded and what
ids + payload a medium part becomes (`DataHooks.media`), and the user turn of a plain caption/transcript sample
(`DataHooks.turn`); this module renders the conversation with the chosen template and collects the payloads.

An item is `{"input_ids", "labels", KIND: [payload, ...]}` (one list per modality with media in the sample, in the
order the media stand); each plug-in's `collate` reads its list.

A shard sample is either a conversation (a `chat.json` member: chat-style messages whose media parts name the
sample's other members, e.g. `m0.jpg`) or a plain one (one medium member + `.txt`): the latter is the one-turn
conversation its medium's plug-in describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mm_llama.data.badsamples import SampleError
from mm_llama.data.conversation import CHAT_MEMBER, Message, Part, decoded_messages, render, template_of

from .modality import AnswerOptions, media_member
from .registry import MODALITIES


def modality_of_medium(kinds: Sequence[str]) -> dict[str, str]:
    """medium name -> the modality (among `kinds`) that reads it (the first in registry order)."""
    out: dict[str, str] = {}
    for k in kinds:
        out.setdefault(MODALITIES[k].data.medium.name, k)
    return out


def member_ext(member: str) -> str:
    """A conversation member's file extension (`m0.jpg` -> `jpg`)."""
    return member.rsplit(".", 1)[-1].lower()


@dataclass
class SampleOptions:
    template: str = "auto"
    train_on: str = "assistant"
    max_text_tokens: int = 0
    max_tokens: int = 0  # > 0: a longer sample is a counted skip naming it


class Samples:
    """Raw shard samples (or conversations) -> items, for a model with these modalities. Picklable (DataLoader
    workers receive it): it holds the plug-ins' media makers, which hold no model."""

    def __init__(self, tok, makers: dict, options: SampleOptions, answer: AnswerOptions, plain_kinds=None):
        self.tok, self.makers, self.options, self.answer = tok, makers, options, answer
        self.by_medium = modality_of_medium(list(makers))
        # which modalities a plain (one medium + text) sample may be; None: any with a maker
        self.plain_kinds = list(plain_kinds or makers)

    @classmethod
    def of(
        cls,
        model,
        tok,
        *,
        kinds: Sequence[str] | None = None,
        options: SampleOptions | None = None,
        answer: AnswerOptions | None = None,
        cfg=None,
        plain_kinds=None,
    ) -> Samples:
        """Makers for `kinds` (default: every loaded part) of `model`; `cfg`: the training config's `model` section
        (a plug-in's maker may read it, e.g. speech's cached encoder outputs)."""
        answer = answer or AnswerOptions()
        kinds = list(kinds if kinds is not None else model.kinds)
        makers = {k: MODALITIES[k].data.media(model, tok, answer, cfg) for k in kinds}
        return cls(tok, makers, options or SampleOptions(), answer, plain_kinds)

    def kind_of(self, medium: str, where: str) -> str:
        """The modality that reads this medium, or a counted SampleError naming `where`."""
        kind = self.by_medium.get(medium)
        if kind is None:
            loaded = ", ".join(self.by_medium) or "none"
            raise SampleError(f"no_{medium}_part", f"{where}: a {medium} part, but no adapter reads it ({loaded})")
        return kind

    # --- conversations -> items ------------------------------------------------------------------
    def render(self, messages: Sequence[Message], *, conversation: bool, add_generation_prompt: bool = False):
        """(item, Rendered) for messages whose medium parts hold decoded values."""
        o = self.options
        items: dict[str, list] = {}

        def splice(part: Part):
            kind = self.kind_of(part.kind, part.name)
            ids, payload = self.makers[kind].splice(part.ref)
            items.setdefault(kind, []).append(payload)
            return ids, payload

        template = template_of(self.tok, o.template, conversation)
        r = render(
            messages,
            self.tok,
            template,
            splice,
            train_on=o.train_on,
            max_text_tokens=o.max_text_tokens,
            add_generation_prompt=add_generation_prompt,
        )
        return {"input_ids": r.input_ids, "labels": r.labels, **items}, r

    def request(self, messages: Sequence[Message], *, conversation: bool = True) -> dict:
        """A generation request (prompt ids + payloads) ending with an open assistant turn."""
        item, _ = self.render(messages, conversation=conversation, add_generation_prompt=True)
        item.pop("labels")
        return item

    def plain_turn(self, kind: str, value, name: str = "") -> list[Message]:
        """The user turn of a caption/transcript request for one decoded medium, as its plug-in lays it out."""
        part = Part(MODALITIES[kind].data.medium.name, ref=value, name=name)
        return [Message("user", MODALITIES[kind].data.turn(part, self.answer))]

    # --- raw shard samples -> items -----------------------------------------------------------------
    def messages(self, raw: dict) -> tuple[list[Message], bool]:
        """(messages with decoded media, whether the sample is a conversation) for a raw shard sample."""
        where = f"{raw.get('__shard__', '')}:{raw.get('__key__', '')}"
        if "__too_large__" in raw:
            raise SampleError("member_too_large", raw["__too_large__"])
        if CHAT_MEMBER in raw:
            return self._conversation(raw, where), True
        for kind in self.plain_kinds:
            ext = media_member(raw, MODALITIES[kind].data.medium.exts)
            if ext is not None:
                return self._plain(raw, kind, ext, where), False
        wanted = " or ".join(MODALITIES[k].data.medium.name for k in self.plain_kinds)
        raise SampleError(f"missing_{wanted.replace(' or ', '_or_')}", f"{where}: no {wanted} member")

    def rendered(self, raw: dict):
        """(item, Rendered) for a raw shard sample (`mm-llama data preview` shows the Rendered)."""
        messages, conversation = self.messages(raw)
        return self.render(messages, conversation=conversation)

    def __call__(self, raw: dict) -> dict:
        item = self.rendered(raw)[0]
        limit = self.options.max_tokens
        if limit and len(item["input_ids"]) > limit:
            where = f"{raw.get('__shard__', '')}:{raw.get('__key__', '')}"
            raise SampleError("too_long", f"{where}: {len(item['input_ids'])} tokens > data.max_tokens {limit}")
        return item

    def _plain(self, raw: dict, kind: str, ext: str, where: str) -> list[Message]:
        if "txt" not in raw:
            raise SampleError("missing_text", f"{where}: no .txt")
        value = self.makers[kind].plain(raw, ext)
        text = raw["txt"].decode("utf-8")
        return [*self.plain_turn(kind, value, f"{raw['__key__']}.{ext}"), Message("assistant", [Part("text", text)])]

    def _conversation(self, raw: dict, where: str) -> list[Message]:
        def decode(part: Part, data: bytes):
            maker = self.makers[self.kind_of(part.kind, where)]
            return maker.decode(data, f"{where}:{part.ref}", member_ext(part.ref))

        return decoded_messages(raw, where, decode)


def plain_requests(model, tok, kind: str, values: Sequence, name: str, opts: AnswerOptions) -> list[dict]:
    """Caption/transcript requests for decoded media of one kind (one each), laid out as training lays out a plain
    sample of that kind (the plug-in's `turn`, the plain template)."""
    samples = Samples.of(model, tok, kinds=[kind], answer=opts)
    return [samples.request(samples.plain_turn(kind, v, name), conversation=False) for v in values]
