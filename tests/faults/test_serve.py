"""The web page answers every request with a fitting HTTP status, times out stalled sockets, bounds its workers
and accepts only its own Host names."""

import http.client
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests import tiny
from tests.ddp_helpers import free_port
from tests.faults.test_audio import wav_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm_path, smollm):
    tmp = tmp_path_factory.mktemp("serve")
    files = tiny.adapter_files(smollm, tmp, ["image", "speech"])
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mm-llama"),
        "serve",
        "--model",
        str(smollm_path),
        "--adapter",
        str(files["image"]),
        "--adapter",
        str(files["speech"]),
        "--port",
        str(port),
        "--max-new-tokens",
        "2",
        "--timeout",
        "2",
        "--workers",
        "2",
        "--max-upload-mb",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(240):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def post(port, body: bytes, name="x.png", headers=None, retries: int = 20):
    """POST a file; a 503 (a worker from the previous request not yet released on a loaded machine) is retried,
    as a client of a busy server would."""
    for _ in range(retries):
        status, out = _post_once(port, body, name, headers)
        if status != 503:
            break
        time.sleep(0.25)
    return status, out


def _post_once(port, body: bytes, name, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"X-Filename": name, "Content-Length": str(len(body))} | (headers or {})
    c.putrequest("POST", "/api/process", skip_host="Host" in h, skip_accept_encoding=True)
    for k, v in h.items():
        if v is not None:
            c.putheader(k, v)
    c.endheaders()
    c.send(body)
    r = c.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    c.close()
    return out


def raw_status(port, head: str, retry_busy: bool = True) -> int:
    """Send only a request head (the server answers these without reading a body) and read the status code: no
    race with a server that closes the connection once it has answered. 503 is retried unless told not to."""
    for _ in range(20):
        status = _raw_once(port, head)
        if status != 503 or not retry_busy:
            return status
        time.sleep(0.25)
    return status


def _raw_once(port, head: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode() + b"\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_statuses(server):
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(png, format="PNG")
    assert post(server, png.getvalue())[0] == 200
    assert post(server, wav_bytes(0.5), "a.wav")[0] == 200
    head = "POST /api/process HTTP/1.1\r\nHost: localhost\r\nX-Filename: a.png"
    assert raw_status(server, head + "\r\nContent-Length: abc") == 400
    assert raw_status(server, head) == 411
    assert raw_status(server, head + "\r\nContent-Length: 0") == 413
    assert raw_status(server, head + f"\r\nContent-Length: {10**8}") == 413
    status, body = post(server, b"hello", "notes.txt")
    assert status == 415 and "unknown file type" in body["error"]
    status, body = post(server, b"\x89PNG garbage", "broken.png")
    assert status == 422 and "broken.png" in body["error"]
    status, body = post(server, wav_bytes(0.01), "tiny.wav")
    assert status == 422 and "too short" in body["error"]


@pytest.mark.parametrize("method", ["HEAD", "PUT", "OPTIONS", "DELETE"])
def test_other_methods_are_405(server, method):
    assert raw_status(server, f"{method} / HTTP/1.1\r\nHost: localhost") == 405


def test_a_file_type_no_adapter_reads_is_415_before_its_body(server):
    """The head alone (a huge declared body never sent) gets its 415: the server reads no byte of it."""
    head = "POST /api/process HTTP/1.1\r\nHost: localhost\r\nX-Filename: movie.mp4"
    assert raw_status(server, head + f"\r\nContent-Length: {10**5}") == 415


@pytest.mark.parametrize("host", ["evil.example.com", "127.0.0.1.evil.com:8765", ""])
def test_foreign_host_is_refused(server, host):
    status, body = post(server, b"x", headers={"Host": host})
    assert status == 403


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "[::1]:80"])
def test_loopback_hosts_are_accepted(server, host):
    assert post(server, b"hello", "notes.txt", headers={"Host": host})[0] == 415


def test_stalled_upload_times_out_and_workers_are_bounded(server):
    stalled = []
    for _ in range(2):  # hold both workers with uploads that stop after a few bytes
        s = socket.create_connection(("127.0.0.1", server))
        s.sendall(
            b"POST /api/process HTTP/1.1\r\nHost: localhost\r\nX-Filename: a.png\r\nContent-Length: 1000\r\n\r\nabc"
        )
        stalled.append(s)
    time.sleep(0.5)
    head = "POST /api/process HTTP/1.1\r\nHost: localhost\r\nX-Filename: a.txt"
    assert raw_status(server, head, retry_busy=False) == 503
    for s in stalled:  # the server gives up on them after --timeout (2 s): the connection is closed
        s.settimeout(10)
        t0 = time.monotonic()
        data = s.recv(4096)
        assert time.monotonic() - t0 < 9 and (data == b"" or b"400" in data.split(b"\r\n")[0])
        s.close()
    assert post(server, b"hello", "notes.txt")[0] == 415  # the workers are free again
