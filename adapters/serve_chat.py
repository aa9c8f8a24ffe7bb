"""The chat of `mm-llama serve`'s page: uploaded media kept under random ids, and conversations answered by the one
path of `mm-llama ask` / `mm-llama chat` (adapters/chat.py: `media_value`, `samples_for`, `answer_request`).

The server keeps no conversation: the page sends the whole history each turn, its media as the ids that
POST /api/upload returned. An upload is stored in the server's private temporary folder under its id (uuid4 hex),
never under a name the client chose; the client's file name gives only the extension (its kind) and the name shown in
messages. At most MEDIA_FILES uploads, and MEDIA_UPLOADS times --max-upload-mb bytes, are kept: the least recently
used go first, and a conversation naming one of those is told to attach it again.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mm_llama.data.badsamples import SampleError
from mm_llama.data.conversation import Message, Part

from .chat import TextSink, answer_request, media_value, samples_for, user_turn

MEDIA_FILES = 64  # uploads kept at once
MEDIA_UPLOADS = 8  # and at most this many --max-upload-mb worth of bytes
CHAT_BYTES = 1_000_000  # the largest conversation body (JSON)
MEDIA_ID = re.compile(r"[0-9a-f]{32}")
ROLES = ("user", "assistant")


class HttpError(Exception):
    """A request answered with `code` and `{"error": message}`."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Stored:
    name: str  # the client's file name (shown in messages; its extension says the kind)
    kind: str
    path: Path
    size: int


class MediaStore:
    """Uploaded files under one folder, each named by its random id; bounded in count and bytes (least recently used
    out first). Thread-safe."""

    def __init__(self, folder: Path, max_files: int, max_bytes: int):
        self.folder, self.max_files, self.max_bytes = folder, max_files, max_bytes
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.lock = threading.Lock()

    def reserve(self) -> tuple[str, Path]:
        """A new id and the path its upload is written to before it is added."""
        mid = uuid.uuid4().hex
        return mid, self.folder / f"{mid}.part"

    def add(self, mid: str, name: str, kind: str, written: Path) -> None:
        path = written.replace(self.folder / mid)
        with self.lock:
            self.items[mid] = Stored(name, kind, path, path.stat().st_size)
            self._evict()

    def _evict(self) -> None:
        total = sum(s.size for s in self.items.values())
        while len(self.items) > self.max_files or total > self.max_bytes:
            _, old = self.items.popitem(last=False)
            old.path.unlink(missing_ok=True)
            total -= old.size

    def read(self, mid: str) -> tuple[str, bytes]:
        """(file name, bytes) of an upload, or 422 naming the id."""
        with self.lock:
            stored = self.items.get(mid)
            if stored is None:
                raise HttpError(
                    422, f"media {mid} is not on this server (unknown, or dropped to make room): attach the file again"
                )
            self.items.move_to_end(mid)
            return stored.name, stored.path.read_bytes()

    def __len__(self) -> int:
        return len(self.items)


def parse_chat(body: bytes) -> list[dict]:
    """The messages of a POST /api/chat body, checked: {"messages": [{"role": "user"|"assistant", "parts": [{"type":
    "text", "text": STR} | {"type": "media", "id": ID}, ...]}, ...]}, media in user messages only, the last message
    the user's. 400 saying what is wrong."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"the body is not JSON ({e})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, 'expected {"messages": [...]} with at least one message')
    for i, m in enumerate(messages):
        check_message(f"messages[{i}]", m)
    if messages[-1]["role"] != "user":
        raise HttpError(400, "the last message must be the user's")
    media = sum(p["type"] == "media" for m in messages for p in m["parts"])
    if media > MEDIA_FILES:
        raise HttpError(400, f"{media} media parts: at most {MEDIA_FILES} in one conversation")
    return messages


def check_message(where: str, m) -> None:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise HttpError(400, f"{where}: a message is {{role: {' or '.join(ROLES)}, parts: [...]}}")
    parts = m.get("parts")
    if not isinstance(parts, list) or not parts:
        raise HttpError(400, f"{where}: parts must be a non-empty list")
    for j, p in enumerate(parts):
        check_part(f"{where}.parts[{j}]", p, m["role"])


def check_part(where: str, p, role: str) -> None:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text" and isinstance(p.get("text"), str):
        return
    if kind == "media" and role == "user":
        mid = p.get("id")
        if isinstance(mid, str) and MEDIA_ID.fullmatch(mid):
            return
        raise HttpError(400, f"{where}: media id {str(mid)[:40]!r} is not one this server gives (32 hex digits)")
    want = '{"type": "text", "text": ...} or, from the user, {"type": "media", "id": ...}'
    raise HttpError(400, f"{where}: expected {want}")


class Chat:
    """The page's conversations on a loaded model: uploads checked and stored, turns laid out and answered as
    `mm-llama chat` answers them. Answering needs the caller to hold the model's lock."""

    def __init__(self, model, tok, args, folder: Path):
        self.model, self.tok, self.args = model, tok, args
        self.samples = samples_for(model, tok, args)
        self.store = MediaStore(folder, MEDIA_FILES, MEDIA_UPLOADS * int(args.max_upload_mb * 1e6))
        self.system = [Message("system", [Part("text", args.system)])] if args.system else []

    def check_upload(self, name: str, path: Path) -> None:
        """422 when the uploaded file does not decode (the same decoding the answer uses)."""
        try:
            media_value(self.model, self.samples, name, path.read_bytes())
        except SampleError as e:
            raise HttpError(422, str(e)) from None

    def messages(self, parsed: list[dict]) -> list[Message]:
        """The checked messages (parse_chat) with their media read and decoded; --system first."""
        turns = [(m["role"], [self._part(p) for p in m["parts"]]) for m in parsed]
        return self.system + [user_turn(parts) if role == "user" else Message(role, parts) for role, parts in turns]

    def _part(self, p: dict) -> Part:
        if p["type"] == "text":
            return Part("text", p["text"])
        name, data = self.store.read(p["id"])
        try:
            return media_value(self.model, self.samples, name, data)
        except SampleError as e:
            raise HttpError(422, str(e)) from None

    def request(self, messages: list[Message]) -> dict:
        """The generation request, or 422 (a part no adapter reads) / 413 (longer than the tower's context)."""
        try:
            request = self.samples.request(messages)
        except SampleError as e:
            raise HttpError(422, str(e)) from None
        n, new, limit = len(request["input_ids"]), self.args.max_new_tokens, self.model.args.max_seq_len
        if n + new > limit:
            raise HttpError(
                413, f"the conversation is {n} tokens; with {new} new ones it exceeds the tower's {limit}: start anew"
            )
        return request

    def answer(self, request: dict, on_text: TextSink) -> str:
        return answer_request(self.model, self.tok, request, self.args, on_text)
