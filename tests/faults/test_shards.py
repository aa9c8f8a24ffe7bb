"""Shards: compressed tars stream like plain ones (no false truncation, bounded memory), truncation is still
detected and counted, and `shards write` never leaves stale shards beside a new index."""

import gzip
import io
import json
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from mm_llama.cli import main as cli_main
from mm_llama.data.badsamples import SampleError
from mm_llama.data.shards import TruncatedShard, decode_fields, iter_samples, read_index, verify_shards
from tests.data.test_shards import MM, make_manifest

ROOT = Path(__file__).resolve().parents[2]
PLAIN = ROOT / "tests/assets/shards/image/shard-000000.tar"


def samples(path: Path, **kw):
    with open(path, "rb") as f:
        return list(iter_samples(f, str(path), **kw))


def test_gzip_shard_streams_every_sample(tmp_path):
    gz = tmp_path / "shard.tar.gz"
    gz.write_bytes(gzip.compress(PLAIN.read_bytes()))
    plain, packed = samples(PLAIN), samples(gz)
    assert len(packed) == len(plain) > 0
    assert [{k: v for k, v in s.items() if k != "__shard__"} for s in packed] == [
        {k: v for k, v in s.items() if k != "__shard__"} for s in plain
    ]
    rep = verify_shards([str(gz)])
    assert rep.bad == 0 and rep.samples == len(plain) and "truncated_tar" not in rep.reasons


def _cuts(data: bytes) -> list[int]:
    """Offsets inside the members (not in the end-of-archive padding): half way, and inside the last member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    return [last.offset_data // 2, last.offset_data + max(1, last.size // 2)]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("which", [0, 1])
def test_truncation_is_detected_and_counted(tmp_path, compress, which):
    data = PLAIN.read_bytes()
    cut = _cuts(data)[which]
    if compress:  # cut the compressed stream at the same fraction
        z = gzip.compress(data)
        data, cut = z, int(len(z) * cut / len(data))
    bad = tmp_path / ("cut.tar.gz" if compress else "cut.tar")
    bad.write_bytes(data[:cut])
    with pytest.raises(TruncatedShard, match="cut.tar"):
        samples(bad)
    rep = verify_shards([str(bad)])
    assert rep.reasons["truncated_tar"] == 1


def _bomb(tmp_path, mb: int) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("a.txt", b"small"), ("a.bin", bytes(mb * 2**20)), ("b.txt", b"next sample")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shard = tmp_path / f"bomb{mb}.tar.gz"
    shard.write_bytes(gzip.compress(buf.getvalue()))
    assert shard.stat().st_size < mb * 2**20 // 500  # zeros compress to almost nothing
    return shard


def test_oversized_member_is_skipped_unread_with_bounded_memory(tmp_path):
    peaks = []
    for mb in (32, 128):
        shard = _bomb(tmp_path, mb)
        tracemalloc.start()
        out = samples(shard, max_member_bytes=2**20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert [s["__key__"] for s in out] == ["a", "b"] and "bin" not in out[0] and out[1]["txt"] == b"next sample"
        with pytest.raises(SampleError, match=f"a.bin is {mb * 2**20} bytes, over the 1048576-byte limit"):
            decode_fields(out[0])
    # bounded: the peak does not grow with the member (the decompressor's working set only)
    assert max(peaks) < 40 * 2**20 and abs(peaks[1] - peaks[0]) < 4 * 2**20, peaks


def test_shards_write_refuses_a_folder_with_shards_unless_replace(tmp_path):
    m = make_manifest(tmp_path, n=4)
    out = tmp_path / "out"

    def write(*extra, maxcount="2"):
        return subprocess.run(
            [MM, "shards", "write", str(m), "--out", str(out), "--maxcount", maxcount, "--quiet", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert write().returncode == 0 and len(list(out.glob("*.tar"))) == 2
    (out / "old-000009.tar").write_bytes(PLAIN.read_bytes())  # a stale shard of an earlier run
    (out / "README").write_text("mine")
    r = write()
    assert r.returncode == 2 and "--replace" in r.stderr and "Traceback" not in r.stderr
    r = write("--replace", maxcount="4")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README", "index.json", "shard-000000.tar"]
    urls, _ = read_index(out / "index.json")
    assert len(urls) == 1 and json.loads((out / "index.json").read_text())["samples"] == 4


def test_shards_write_out_naming_a_file(tmp_path):
    m = make_manifest(tmp_path, n=2)
    (tmp_path / "afile").write_text("x")
    r = subprocess.run(
        [MM, "shards", "write", str(m), "--out", str(tmp_path / "afile"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "afile" in r.stderr and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_shards_write_says_when_nothing_is_written_and_reads_what_editors_write(tmp_path, capsys):
    """An empty manifest (or one whose every line is skipped) is exit 1 with one line and leaves no empty shard or
    index; a line with two media is skipped with its reason; a byte-order mark is read, not a JSON error."""
    m = make_manifest(tmp_path, n=2)
    lines = m.read_text().splitlines()
    (tmp_path / "empty.jsonl").write_text("")
    rec = json.loads(lines[0]) | {"audio": "x.wav"}
    (tmp_path / "both.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "bom.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    for name, want in (("empty", "holds no sample"), ("both", "one medium per manifest line")):
        out = tmp_path / f"out-{name}"
        assert cli_main(["shards", "write", str(tmp_path / f"{name}.jsonl"), "--out", str(out), "--quiet"]) == 1
        assert want in capsys.readouterr().err and list(out.iterdir()) == []
    assert cli_main(["shards", "write", str(tmp_path / "bom.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2


def test_shards_encode_refuses_what_it_cannot_cache(tmp_path, capsys):
    """`shards encode` of an image index caches nothing: an error, not exit 0; a truncated input shard is one line
    naming it, and no half-written copy is left."""
    enc = ["--encoder", "conformer:debug"]
    image = "tests/assets/shards/image/index.json"
    assert cli_main(["shards", "encode", image, *enc, "--out", str(tmp_path / "a")]) == 2
    assert "nothing to cache" in capsys.readouterr().err and not list((tmp_path / "a").glob("*"))
    src = Path("tests/assets/shards/audio")
    cut = tmp_path / "cut"
    cut.mkdir()
    first = sorted(src.glob("*.tar"))[0]
    (cut / first.name).write_bytes(first.read_bytes()[:30000])
    (cut / "index.json").write_text(json.dumps({"version": 1, "shards": [{"url": first.name, "samples": 2}]}))
    assert cli_main(["shards", "encode", str(cut / "index.json"), *enc, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert first.name in err and "broken" in err and "Traceback" not in err and not list((tmp_path / "b").glob("*"))
