"""Writing webdataset shards (+ their index.json): from a JSONL manifest or a folder of paired files, and derived
copies with extra members (e.g. a frozen encoder's outputs). Every sample's media are checked by their medium's
decoder before they are written; bad samples are skipped and counted, naming the file and line.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .badsamples import SampleError
from .conversation import CHAT_MEMBER, Part, messages_json
from .media import MEDIA, medium_for_ext
from .shards import INDEX_VERSION, SHARD_SUFFIXES, TruncatedShard, iter_samples, open_url, read_index


def sanitize_key(stem: str, index: int) -> str:
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:60].strip("_")
    return f"{index:08d}_{clean}" if clean else f"{index:08d}"


def manifest_samples(manifest: str | Path) -> Iterator[dict]:
    """Samples from a JSONL manifest: {MEDIUM: path, "text": str, ...extra fields}, MEDIUM a registered medium's name
    ("image", "video", "audio", ...)."""
    manifest = Path(manifest)
    with manifest.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.lstrip("\ufeff")  # a byte-order mark (editors on Windows write one) is not JSON
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"__error__": ("bad_manifest_line", f"{manifest}:{lineno}: invalid JSON ({e})")}
                continue
            for m in MEDIA:
                if m in rec and not Path(rec[m]).is_absolute():
                    rec[m] = str(manifest.parent / rec[m])
            rec["__source__"] = f"{manifest}:{lineno}"
            yield rec


def folder_samples(folder: str | Path) -> Iterator[dict]:
    """Samples from a folder of paired files: NAME.(jpg|png|mp4|flac|...: a registered medium's) + NAME.txt
    (+ NAME.json)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        medium = medium_for_ext(p.suffix.lstrip(".")) if p.suffix else None
        if not p.is_file() or medium is None:
            continue
        rec = {medium.name: str(p), "__source__": str(p)}
        txt = p.with_suffix(".txt")
        if txt.is_file():
            rec["text"] = txt.read_text(encoding="utf-8")
        meta = p.with_suffix(".json")
        if meta.is_file():
            rec["json"] = json.loads(meta.read_text(encoding="utf-8"))
        yield rec


def read_medium(kind: str, ref, src: str) -> tuple[Path, str, bytes]:
    """(path, member extension, bytes) of a medium a record names (a path, or a `(name, bytes)` pair made in
    memory), checked by its medium's decoder; a SampleError naming `src` and the file otherwise."""
    if isinstance(ref, tuple):
        path, data = Path(ref[0]), ref[1]
    else:
        path = Path(ref)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SampleError("missing_file", f"{src}: cannot read {path} ({e.strerror})") from None
    ext = path.suffix.lower().lstrip(".") or "bin"
    if ext not in MEDIA[kind].exts:
        exts = " ".join(MEDIA[kind].exts)
        raise SampleError("wrong_extension", f"{src}: {path} is not stored as {kind} (its extensions: {exts})")
    MEDIA[kind].verify(data, str(path), ext)
    return path, "jpg" if ext == "jpeg" else ext, data


def conversation_sample(rec: dict, index: int) -> dict:
    """The tar members of a conversation record: its media as `m0.EXT`, `m1.EXT`, ... and `chat.json` (the
    messages, each medium part naming its member), plus `json` (extra fields) when given."""
    src = rec.get("__source__", "?")
    messages = rec["messages"]
    out: dict = {}
    j = 0
    for m in messages:
        parts = []
        for p in m.parts:
            if p.kind != "text":
                path, ext, data = read_medium(p.kind, p.ref, src)
                member = f"m{j}.{ext}"
                out[member], j = data, j + 1
                p = Part(p.kind, ref=member, name=p.name or path.name)
            parts.append(p)
        m.parts = parts
    first = next((p.name for m in messages for p in m.parts if p.kind != "text"), "chat")
    out["__key__"] = sanitize_key(Path(first).stem, index)
    out[CHAT_MEMBER] = json.dumps({"messages": messages_json(messages)}, ensure_ascii=False).encode("utf-8")
    if rec.get("json"):
        out["json"] = json.dumps(rec["json"], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return out


@dataclass
class WriteReport:
    written: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list = field(default_factory=list)
    shards: list = field(default_factory=list)
    seconds: float = 0.0


def _prepare_out_dir(out_dir: str | Path, replace: bool) -> Path:
    """The folder new shards go into: created if missing; one that already holds shards or an index is refused
    unless `replace`, which first removes them (so no stale shard is left beside the new index)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder (shards go into a folder)")
    old = [p for p in out_dir.glob("*") if p.name == "index.json" or p.name.endswith(SHARD_SUFFIXES)]
    if old and not replace:
        raise ValueError(
            f"{out_dir}: already holds {len(old)} shard files / an index; pass --replace (replace=True) "
            "to remove them first, or choose an empty folder"
        )
    for f in old:
        f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 512e6,
    mtime: float = 946684800.0,  # 2000-01-01: fixed, so re-runs give byte-identical shards
    progress: bool = True,
    replace: bool = False,
) -> WriteReport:
    # long: one pass over the records: check, encode, write, count, each sample once
    """Write samples into `out_dir/{prefix}-NNNNNN.tar` with webdataset's ShardWriter + `out_dir/index.json`.

    Media fields hold a file path or a `(name, bytes)` pair. Each sample's media is decoded once before writing;
    undecodable ones are skipped and reported. A folder that already holds shards or an index is refused unless
    `replace`, which first removes them (so no stale shard is left beside the new index)."""

    out_dir = _prepare_out_dir(out_dir, replace)
    rep = WriteReport()
    t0 = time.perf_counter()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    counts: Counter = Counter()
    writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=mtime, encoder=False)
    bar = tqdm(samples, unit="sample", disable=not progress, desc="writing shards")

    def skip(reason, msg):
        rep.skipped += 1
        rep.reasons[reason] += 1
        if len(rep.first_errors) < 10:
            rep.first_errors.append(msg)

    try:
        for rec in bar:
            if "__error__" in rec:
                skip(*rec["__error__"])
                continue
            src = rec.get("__source__", "?")
            if "messages" in rec:
                try:
                    out = conversation_sample(rec, rep.written)
                except SampleError as e:
                    skip(e.reason, str(e))
                    continue
                writer.write(out)
                counts[writer.fname] += 1
                rep.written += 1
                continue
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                skip("empty_text", f"{src}: missing or empty text")
                continue
            media = [m for m in MEDIA if m in rec]
            if len(media) > 1:
                msg = f"{src}: holds {' and '.join(media)}: one medium per manifest line (several: --from messages)"
                skip("several_media", msg)
                continue
            first = rec.get(media[0]) if media else src
            first = first[0] if isinstance(first, tuple) else first
            out = {"__key__": sanitize_key(Path(str(first)).stem, rep.written)}
            try:
                for m in media:
                    _path, ext, data = read_medium(m, rec[m], src)
                    out[ext] = data
            except SampleError as e:
                skip(e.reason, str(e))
                continue
            out["txt"] = text.encode("utf-8")
            extra = {k: v for k, v in rec.items() if k not in MEDIA and k != "text" and not k.startswith("__")}
            extra = extra.get("json", extra) if set(extra) == {"json"} else extra
            if extra:
                out["json"] = json.dumps(extra, sort_keys=True, ensure_ascii=False).encode("utf-8")
            writer.write(out)
            counts[writer.fname] += 1
            rep.written += 1
    finally:
        writer.close()
        bar.close()
    rep.seconds = time.perf_counter() - t0
    if not rep.written:  # nothing to index: no empty shard or index is left behind
        for f in out_dir.glob(f"{prefix}-*.tar"):
            f.unlink()
        return rep
    rep.shards = [{"url": Path(f).name, "samples": n} for f, n in sorted(counts.items())]
    index = {"version": INDEX_VERSION, "samples": rep.written, "shards": rep.shards}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return rep


def derive_shards(
    index: str | Path,
    out_dir: str | Path,
    add: Callable[[list[dict]], list[dict]],
    *,
    batch: int = 32,
    prefix: str = "derived",
    replace: bool = False,
) -> WriteReport:
    """Copy the shards of `index` into `out_dir` (same samples, same order, new index.json), each sample with the
    extra members `add(samples)` returns for it (one dict of `{ext: bytes}` per sample, computed a batch at a time):
    e.g. a frozen encoder's outputs, computed once per clip instead of once per epoch."""

    urls, counts = read_index(index)
    out_dir = _prepare_out_dir(out_dir, replace)
    rep, t0 = WriteReport(), time.perf_counter()
    shards = []
    try:
        for i, (url, n) in enumerate(zip(urls, counts, strict=True)):
            name = f"{prefix}-{i:06d}.tar"
            shards.append({"url": name, "samples": n})
            with wds.TarWriter(str(out_dir / name), encoder=False, mtime=946684800.0) as w:
                it = iter_samples(open_url(url), url)
                while chunk := list(itertools.islice(it, batch)):
                    for s, extra in zip(chunk, add(chunk), strict=True):
                        w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} | extra)
                        rep.written += 1
    except (TruncatedShard, OSError) as e:  # a damaged input: nothing half-written is left
        for sh in shards:
            (out_dir / sh["url"]).unlink(missing_ok=True)
        raise ValueError(f"{e} -- no copy written (repair or drop that shard first: mm-llama shards verify)") from None
    rep.shards, rep.seconds = shards, time.perf_counter() - t0
    index_out = {"version": INDEX_VERSION, "samples": rep.written, "shards": shards}
    (out_dir / "index.json").write_text(json.dumps(index_out, indent=1) + "\n")
    return rep
