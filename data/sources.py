"""Reading people's data as they have it, for `mm-llama shards write --from FORMAT SRC`: each reader yields records
for `write_shards` (data/writer.py), one per sample, naming where it came from (`__source__`: file and line or
entry). A record the reader cannot make sense of is an `__error__` record, which the writer counts as a skipped
sample with its reason; media files are read and checked by the writer.

  manifest     JSONL, one `{MEDIUM: path, "text": ...}` per line, or a folder of NAME.(jpg|mp4|flac|...) +
               NAME.txt pairs (what `shards write` has always read)
  messages     JSONL, Hugging Face chat style: `{"messages": [{"role", "content": str | [{"type": "text", "text"}
               | {"type": "image"|"video"|"audio", MEDIUM|"path": FILE}]}]}`; text-only conversations too
  llava        LLaVA JSON: a list of `{"id", "image": FILE (or a list), "conversations": [{"from": "human"|"gpt"|
               "system", "value": "...<image>..."}]}`; `<image>` marks where the image stands (none: before the
               first human turn's text, as LLaVA does)
  coco         COCO captions JSON (`images` + `annotations`): one caption sample per image (its first caption;
               all of them in the sample's JSON as `captions`)
  librispeech  LibriSpeech folders: `*.trans.txt` lines `ID TEXT` next to `ID.flac`

Relative media paths resolve against `media_root` when given, else the source file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .badsamples import SampleError
from .conversation import Message, Part, messages_json, parse_messages
from .media import MEDIA
from .writer import folder_samples, manifest_samples

FORMATS = ("manifest", "messages", "llava", "coco", "librispeech")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_source(fmt: str, src: str | Path, media_root: str | Path | None = None) -> Iterator[dict]:
    """Records of `src` in format `fmt` (FORMATS)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    root = Path(media_root) if media_root else (src if src.is_dir() else src.parent)
    if fmt == "manifest":
        return folder_samples(src) if src.is_dir() else manifest_samples(src)
    if fmt == "messages":
        return messages_records(src, root)
    if fmt == "llava":
        return llava_records(src, root)
    if fmt == "coco":
        return coco_records(src, root)
    if fmt == "librispeech":
        return librispeech_records(src)
    raise ValueError(f"unknown source format {fmt!r} (known: {', '.join(FORMATS)})")


def _error(reason: str, msg: str) -> dict:
    return {"__error__": (reason, msg)}


def _resolve(root: Path, path) -> str:
    p = Path(str(path))
    return str(p if p.is_absolute() else root / p)


def conversation_record(messages: list[Message], root: Path, where: str, **extra) -> dict:
    """A writer record for a conversation whose media parts hold file paths (relative ones under `root`)."""
    for m in messages:
        m.parts = [p if p.kind == "text" else Part(p.kind, ref=_resolve(root, p.ref), name=p.name) for p in m.parts]
    return {"messages": messages, "__source__": where, **extra}


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.lstrip("\ufeff")  # a byte-order mark (editors on Windows write one) is not JSON
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, SampleError("bad_line", f"{where}: invalid JSON ({e})")


def messages_records(path: Path, root: Path) -> Iterator[dict]:
    for where, obj in _json_lines(path):
        if isinstance(obj, SampleError):
            yield _error(obj.reason, str(obj))
            continue
        try:
            msgs = parse_messages(obj, where)
        except SampleError as e:
            yield _error(e.reason, str(e))
            continue
        extra = {k: v for k, v in obj.items() if k != "messages"} if isinstance(obj, dict) else {}
        yield conversation_record(msgs, root, where, **({"json": extra} if extra else {}))


def _llava_messages(entry: dict, where: str) -> list[Message]:
    images = entry.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_conversation", f"{where}: no 'conversations' list")
    msgs: list[Message] = []
    pending = list(images)
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise SampleError("bad_conversation", f"{where}: turn {i} is not a {{from, value}} object")
        role = LLAVA_ROLES.get(str(t.get("from")).lower())
        if role is None:
            raise SampleError("unknown_role", f"{where}: turn {i}: unknown speaker {t.get('from')!r}")
        pieces = t["value"].split("<image>")
        parts = [Part("text", pieces[0])]
        for piece in pieces[1:]:
            if not pending:
                raise SampleError("bad_conversation", f"{where}: turn {i}: more <image> marks than images")
            ref = pending.pop(0)
            parts += [Part("image", ref=ref, name=Path(str(ref)).name), Part("text", piece)]
        msgs.append(Message(role, [p for p in parts if p.kind != "text" or p.text]))
    if pending:  # images with no mark: before the first user turn's text (LLaVA's default)
        first = next((m for m in msgs if m.role == "user"), None)
        if first is None:
            raise SampleError("bad_conversation", f"{where}: images but no human turn")
        first.parts[:0] = [Part("image", ref=r, name=Path(str(r)).name) for r in pending]
    return parse_messages({"messages": messages_json(msgs)}, where)  # the common checks (an assistant turn, ...)


def llava_records(path: Path, root: Path) -> Iterator[dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a LLaVA JSON file ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a LLaVA file is a JSON list of samples")
    for i, entry in enumerate(entries):
        where = f"{path}:{i}" + (f" (id {entry.get('id')})" if isinstance(entry, dict) and "id" in entry else "")
        try:
            if not isinstance(entry, dict):
                raise SampleError("bad_conversation", f"{where}: not an object")
            msgs = _llava_messages(entry, where)
        except SampleError as e:
            yield _error(e.reason, str(e))
            continue
        yield conversation_record(msgs, root, where, **({"json": {"id": entry["id"]}} if "id" in entry else {}))


def coco_records(path: Path, root: Path) -> Iterator[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    captions: dict[int, list[str]] = {}
    for k, a in enumerate(annotations):
        if not isinstance(a, dict) or a.get("image_id") not in images or not isinstance(a.get("caption"), str):
            yield _error("bad_annotation", f"{path}: annotation {k}: no caption for a listed image_id")
            continue
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    for image_id, caps in captions.items():
        yield {
            "image": _resolve(root, images[image_id]),
            "text": caps[0],
            "json": {"image_id": image_id, "captions": caps},
            "__source__": f"{path}: image_id {image_id}",
        }


def librispeech_records(folder: Path) -> Iterator[dict]:
    for trans in sorted(folder.rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            where = f"{trans}:{lineno}"
            audio = next(
                (trans.parent / f"{utt}.{e}" for e in MEDIA["audio"].exts if (trans.parent / f"{utt}.{e}").is_file()),
                None,
            )
            if not text:
                yield _error("empty_text", f"{where}: no transcript for {utt}")
            elif audio is None:
                yield _error("missing_file", f"{where}: no audio file {utt}.flac beside the transcript")
            else:
                yield {"audio": str(audio), "text": text, "json": {"id": utt}, "__source__": where}
