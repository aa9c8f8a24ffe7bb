"""Webdataset shards: shard lists, opening URLs, reading samples, decoding and verifying them (writing:
data/writer.py).

A sample is a run of consecutive tar members sharing a key (the member name up to the first dot of its
basename), e.g. `000001_cat.jpg` + `000001_cat.txt`. Keys we write never contain dots.

URLs: local paths, `file:`, `http(s)://` and `pipe:CMD` -- the last runs a shell command, so it is accepted only
when the caller says the shard list comes from the user's own config (`allow_pipe=True`), never from an index file.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import re
import subprocess
import tarfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from .badsamples import SampleError
from .conversation import CHAT_MEMBER, Part, decoded_messages
from .media import medium_for_ext

TEXT_EXTS = ("txt",)
INDEX_VERSION = 1


class TruncatedShard(RuntimeError):
    """The tar stream ended or broke in the middle; samples before the break were delivered."""


# ----------------------------------------------------------------------------------------------
# shard lists


def _braceexpand(pattern: str) -> list[str]:
    return list(braceexpand.braceexpand(pattern))


def expand_urls(spec: str | Iterable[str], *, allow_pipe: bool = False) -> list[str]:
    """Shard URLs from brace patterns, globs, an index JSON, or a list of any of these."""
    if not isinstance(spec, str):
        out: list[str] = []
        for s in spec:
            out += expand_urls(s, allow_pipe=allow_pipe)
        return out
    if spec.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"refusing pipe: URL {spec!r}: shell commands are accepted only from your own config")
        return _braceexpand(spec)
    if re.match(r"^https?://", spec):
        return _braceexpand(spec)
    path = spec.removeprefix("file:")
    if path.endswith(".json"):
        return read_index(path)[0]
    urls = []
    for p in _braceexpand(path):
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no shard matches {p!r}")
            urls += found
        else:
            urls.append(p)
    return urls


def read_index(path: str | Path) -> tuple[list[str], list[int]]:
    """(shard URLs resolved against the index folder, sample counts) from an index JSON we wrote."""
    path = Path(path)
    try:
        idx = json.loads(path.read_text())
        entries = idx["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a shard index ({type(e).__name__}: {e})") from None
    urls, counts = [], []
    for e in entries:
        url = str(e["url"])
        if url.startswith("pipe:"):
            raise ValueError(f"{path}: index entries may not be pipe: URLs ({url!r})")
        if not re.match(r"^(https?|file):", url) and not Path(url).is_absolute():
            url = str(path.parent / url)
        urls.append(url)
        counts.append(int(e["samples"]))
    return urls, counts


# ----------------------------------------------------------------------------------------------
# reading


class _PipeStream(io.RawIOBase):
    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)

    def readable(self):
        return True

    def readinto(self, b):
        return self.proc.stdout.readinto(b)

    def close(self):
        if not self.closed:
            self.proc.stdout.close()
            rc = self.proc.wait()
            super().close()
            if rc != 0:
                raise OSError(f"pipe command {self.cmd!r} exited with status {rc}")


def open_url(url: str, *, allow_pipe: bool = False):
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"refusing pipe: URL {url!r}: shell commands are accepted only from your own config")
        return io.BufferedReader(_PipeStream(url[5:]), buffer_size=1 << 20)
    if re.match(r"^https?://", url):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - the user's own shard list
    return open(url.removeprefix("file:"), "rb", buffering=1 << 20)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def split_key(member_name: str) -> tuple[str, str]:
    """'dir/000001_cat.jpg' -> ('dir/000001_cat', 'jpg'); the key ends at the first dot of the basename."""
    d, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


class _CountingReader(io.RawIOBase):
    def __init__(self, f):
        self.f, self.n = f, 0

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.n += len(data)
        return len(data)


def read_samples(urls: Iterable[str], limit: int | None = None) -> list[dict]:
    """The samples of these shards in order (evaluation sets); with `limit`, the first `limit` only, and shards
    after them are never opened."""

    return list(itertools.islice((s for u in urls for s in iter_samples(open_url(u), u)), limit))


MAX_MEMBER_BYTES = 256 * 2**20  # a larger member (e.g. a decompression bomb) is skipped unread and reported
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def iter_samples(stream, shard: str = "", *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Samples (dicts of extension -> bytes, plus '__key__', '__shard__', '__index__') from a plain or compressed
    (gzip, bzip2, xz) tar stream, read with `tarfile` in stream mode: memory stays bounded by one sample.

    A member over `max_member_bytes` is not read: its sample gets '__too_large__' (a message) and the data
    loaders count it as a bad sample. A truncated or corrupt tar raises TruncatedShard after the complete samples
    before the break: compressed streams fail their own end-of-stream check; in a plain tar a cut inside a header
    looks like a clean end to `tarfile`, so its end-of-archive block is checked explicitly."""
    index = 0
    current: dict | None = None
    counter = _CountingReader(stream)
    buffered = io.BufferedReader(counter, 1 << 20)
    compressed = buffered.peek(6)[:6].startswith(_COMPRESSED_MAGIC)
    end_of_last = 0
    try:
        with tarfile.open(fileobj=buffered, mode="r|*") as tf:
            for member in tf:
                end_of_last = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not ext:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    index += 1
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard, "__index__": index}
                if member.size > max_member_bytes:  # never read: tarfile skips its data in small chunks
                    current["__too_large__"] = (
                        f"{shard}:{key}: member {member.name} is {member.size} bytes, over "
                        f"the {max_member_bytes}-byte limit"
                    )
                    continue
                f = tf.extractfile(member)
                current[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # the last sample may be incomplete: drop it, report the break
        raise TruncatedShard(f"{shard}: tar stream broken after {index} samples ({type(e).__name__}: {e})") from None
    if not compressed and counter.n < end_of_last + tarfile.BLOCKSIZE:  # the first zero block must be there
        raise TruncatedShard(f"{shard}: tar stream ends without its end-of-archive marker after {index} samples")
    if current is not None:
        yield current


# ----------------------------------------------------------------------------------------------
# decoding one raw sample (also used by the verifier and the writer's checks)


def decode_fields(sample: dict, *, name: str = "", options: dict[str, dict] | None = None) -> dict:
    """Decode every member of a raw sample whose extension a registered medium (data/media.py) stores, its text and
    JSON; the decoded media under their medium's name (`options`: medium name -> its decoder's options, e.g.
    {"video": {"num_frames": 8}}). Raises SampleError with a reason."""
    out = {k: v for k, v in sample.items() if k.startswith("__")}
    name = name or f"{sample.get('__shard__', '')}:{sample.get('__key__', '')}"
    if "__too_large__" in sample:
        raise SampleError("member_too_large", sample["__too_large__"])
    if CHAT_MEMBER in sample:
        return _decode_conversation(sample, name, options, out)
    for ext, data in sample.items():
        if ext.startswith("__"):
            continue
        medium = medium_for_ext(ext)
        if medium is not None:
            out[medium.name] = medium.decode(data, name, ext, **(options or {}).get(medium.name, {}))
        elif ext in TEXT_EXTS:
            try:
                out["text"] = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError("bad_text", f"{name}: text is not UTF-8 ({e})") from None
        elif ext == "json":
            try:
                out["json"] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleError("bad_json", f"{name}: invalid JSON ({e})") from None
        elif ext in ("pyd", "pickle", "pth", "pt", "npy"):
            raise SampleError("unsafe_member", f"{name}: refusing to decode .{ext} (pickled data is never loaded)")
    if "text" not in out:
        raise SampleError("missing_text", f"{name}: sample has no .txt member")
    if not out["text"].strip():
        raise SampleError("empty_text", f"{name}: empty text")
    return out


def _decode_conversation(sample: dict, name: str, options: dict | None, out: dict) -> dict:
    """A conversation sample: its messages (`chat.json`) and every medium they name, decoded, as `messages` (media
    parts' `ref` the decoded values)."""

    def decode(part: Part, data: bytes):
        ext = part.ref.rsplit(".", 1)[-1]
        medium = medium_for_ext(ext)
        if medium is None or medium.name != part.kind:
            raise SampleError("wrong_extension", f"{name}: member {part.ref!r} is not stored as {part.kind}")
        return medium.decode(data, f"{name}:{part.ref}", ext, **(options or {}).get(medium.name, {}))

    out["messages"] = decoded_messages(sample, name, decode)
    return out


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"shards": self.shards, "samples": self.samples, "bad": self.bad, "reasons": dict(self.reasons)}


def verify_shards(urls: list[str], *, allow_pipe: bool = False, options: dict[str, dict] | None = None) -> VerifyReport:
    """Read and decode every sample of every shard, counting problems by reason."""
    rep = VerifyReport()
    for url in urls:
        rep.shards += 1
        try:
            stream = open_url(url, allow_pipe=allow_pipe)
        except (OSError, ValueError) as e:
            rep.bad += 1
            rep.reasons["unreadable_shard"] += 1
            rep.examples.append(f"{url}: {e}")
            continue
        try:
            for s in iter_samples(stream, url):
                rep.samples += 1
                try:
                    decode_fields(s, options=options)
                except SampleError as e:
                    rep.bad += 1
                    rep.reasons[e.reason] += 1
                    rep.examples.append(str(e))
        except TruncatedShard as e:
            rep.bad += 1
            rep.reasons["truncated_tar"] += 1
            rep.examples.append(str(e))
        finally:
            stream.close()
    return rep
