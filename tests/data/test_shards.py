"""Shard writer, reader and verifier: reproducibility, skips with reasons, planted defects, CLI."""

import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from PIL import Image

from mm_llama.data.shards import expand_urls, iter_samples, open_url, read_index, split_key, verify_shards
from mm_llama.data.writer import manifest_samples, write_shards

MM = str(Path(sys.executable).parent / "mm-llama")


def make_manifest(tmp_path, n=5, bad=()):
    recs = []
    for i in range(n):
        p = tmp_path / f"img.{i}.v2.png"  # dots in the name: keys must come out dot-free
        Image.new("RGB", (8 + i, 8), (10 * i, 0, 0)).save(p)
        recs.append({"image": p.name, "text": f"image number {i}", "idx": i})
    if "corrupt" in bad:
        (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        recs.append({"image": "corrupt.jpg", "text": "broken"})
    if "missing" in bad:
        recs.append({"image": "does-not-exist.png", "text": "missing"})
    if "empty" in bad:
        recs.append({"image": "img.0.v2.png", "text": "   "})
    m = tmp_path / "manifest.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs) + ("{not json\n" if "badline" in bad else ""))
    return m


def test_write_reproducible_and_indexed(tmp_path):
    m = make_manifest(tmp_path, n=7)
    a = write_shards(manifest_samples(m), tmp_path / "a", maxcount=3, progress=False)
    write_shards(manifest_samples(m), tmp_path / "b", maxcount=3, progress=False)
    assert a.written == 7 and a.skipped == 0 and [s["samples"] for s in a.shards] == [3, 3, 1]
    for s in a.shards:
        assert (tmp_path / "a" / s["url"]).read_bytes() == (tmp_path / "b" / s["url"]).read_bytes()
    urls, counts = read_index(tmp_path / "a" / "index.json")
    assert counts == [3, 3, 1] and all(Path(u).is_file() for u in urls)
    samples = [s for u in urls for s in iter_samples(open_url(u), u)]
    assert len(samples) == 7
    assert all("." not in s["__key__"] for s in samples)
    assert json.loads(samples[2]["json"]) == {"idx": 2}
    assert samples[2]["txt"] == b"image number 2"


def test_write_skips_and_reports(tmp_path):
    m = make_manifest(tmp_path, n=3, bad=("corrupt", "missing", "empty", "badline"))
    rep = write_shards(manifest_samples(m), tmp_path / "out", progress=False)
    assert rep.written == 3 and rep.skipped == 4
    assert rep.reasons == {"decode_image": 1, "missing_file": 1, "empty_text": 1, "bad_manifest_line": 1}
    assert any("corrupt.jpg" in e for e in rep.first_errors)
    assert any("does-not-exist.png" in e for e in rep.first_errors)


def test_maxsize_limit(tmp_path):
    m = make_manifest(tmp_path, n=6)
    rep = write_shards(manifest_samples(m), tmp_path / "o", maxsize=150, progress=False)  # payload bytes
    assert len(rep.shards) >= 2 and sum(s["samples"] for s in rep.shards) == 6


def _plant_defects(shard_dir: Path, tmp_path: Path) -> list[str]:
    """Copy good shards and add one shard per defect."""
    good = sorted((shard_dir / "image").glob("*.tar"))
    out = []

    def write_tar(name, members):
        p = tmp_path / name
        with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
            for mname, data in members:
                ti = tarfile.TarInfo(mname)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        out.append(str(p))
        return p

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    png = png.getvalue()
    write_tar("corrupt_image.tar", [("a.png", png[:20]), ("a.txt", b"x"), ("b.png", png), ("b.txt", b"ok")])
    write_tar("missing_text.tar", [("c.png", png), ("d.png", png), ("d.txt", b"ok")])
    write_tar("empty_text.tar", [("e.png", png), ("e.txt", b"  ")])
    write_tar("bad_audio.tar", [("f.flac", b"fLaC garbage"), ("f.txt", b"speech")])
    write_tar("zero_frames.tar", [("g.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40), ("g.txt", b"v")])
    write_tar("unsafe.tar", [("h.pyd", b"cos\nsystem\n"), ("h.txt", b"pickle")])
    # truncated tar: cut a good shard in the middle of its second sample
    data = good[0].read_bytes()
    trunc = tmp_path / "truncated.tar"
    trunc.write_bytes(data[: len(data) // 2 + 700])
    out.append(str(trunc))
    return out + [str(g) for g in good]


def test_verify_reports_each_planted_defect(shard_dir, tmp_path):
    urls = _plant_defects(shard_dir, tmp_path)
    rep = verify_shards(urls).summary()
    r = rep["reasons"]
    assert r["decode_image"] == 1 and r["missing_text"] == 1 and r["empty_text"] == 1
    assert r["decode_audio"] == 1 and r["truncated_tar"] == 1 and r["unsafe_member"] == 1
    assert r.get("decode_video", 0) + r.get("zero_frames", 0) == 1
    assert rep["bad"] == sum(r.values()) and rep["shards"] == len(urls)


def test_verify_cli_exit_codes(shard_dir, tmp_path):
    ok = subprocess.run(
        [MM, "shards", "verify", str(shard_dir / "image" / "index.json")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"shards": 2, "samples": 6, "bad": 0, "reasons": {}}
    urls = _plant_defects(shard_dir, tmp_path)
    bad = subprocess.run([MM, "shards", "verify", *urls], capture_output=True, text=True)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["bad"] == 7
    assert "truncated.tar" in bad.stderr


def test_write_cli_from_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (5, 5)).save(src / f"pic{i}.png")
        (src / f"pic{i}.txt").write_text(f"caption {i}")
    (src / "orphan.png").write_bytes(b"junk")
    r = subprocess.run(
        [MM, "shards", "write", str(src), "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["written"] == 3 and summary["skipped"] == 1 and summary["reasons"] == {"empty_text": 1}


def test_url_expansion_and_pipe_policy(shard_dir, tmp_path):
    pat = str(shard_dir / "audio" / "shard-{000000..000002}.tar")
    assert len(expand_urls(pat)) == 3
    assert len(expand_urls(str(shard_dir / "audio" / "*.tar"))) == 3
    assert expand_urls("file:" + str(shard_dir / "video" / "index.json")) == expand_urls(
        str(shard_dir / "video" / "*.tar")
    )
    with pytest.raises(ValueError, match="refusing pipe"):
        expand_urls("pipe:cat x.tar")
    with pytest.raises(ValueError, match="refusing pipe"):
        open_url("pipe:cat x.tar")
    idx = tmp_path / "index.json"
    idx.write_text(json.dumps({"shards": [{"url": "pipe:rm -rf /", "samples": 1}]}))
    with pytest.raises(ValueError, match="may not be pipe"):
        expand_urls(str(idx))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    # a pipe: URL from the user's own config
    url = "pipe:cat " + str(shard_dir / "video" / "shard-000000.tar")
    assert len(list(iter_samples(open_url(url, allow_pipe=True), url))) == 2


def test_split_key():
    assert split_key("a/b/000001_x.seg.jpg") == ("a/b/000001_x", "seg.jpg")
    assert split_key("k.TXT") == ("k", "txt")


def test_http_urls_stream(shard_dir):
    """http(s) shards stream through urllib (a local server on 127.0.0.1 stands in for an object store)."""

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir / "video"))
    handler.log_message = lambda *a, **k: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}/shard-{{000000..000001}}.tar"
        urls = expand_urls(url)
        assert len(urls) == 2
        assert verify_shards(urls, options={"video": {"num_frames": 2}}).summary() == {
            "shards": 2,
            "samples": 3,
            "bad": 0,
            "reasons": {},
        }
        srv.shutdown()
