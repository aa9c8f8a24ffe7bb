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
    refuses_bad_files(server, post)


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


# --- the chat: POST /api/upload, POST /api/chat, GET /api/info ---------------------------------------------------
def request(port, method: str, path: str, body: bytes = b"", headers=None):
    """(status, body bytes) of one request (503 retried, as post does)."""
    for _ in range(20):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        h = {"Content-Length": str(len(body))} if method == "POST" else {}
        h |= headers or {}
        c.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
        for k, v in h.items():
            c.putheader(k, v)
        c.endheaders()
        c.send(body)
        r = c.getresponse()
        status, out = r.status, r.read()
        c.close()
        if status != 503:
            break
        time.sleep(0.25)
    return status, out


def upload(port, data: bytes, name: str) -> tuple[int, dict]:
    status, out = request(port, "POST", "/api/upload", data, {"X-Filename": name})
    return status, json.loads(out)


def chat(port, messages, headers=None) -> tuple[int, list[dict]]:
    """(status, the JSON lines of the answer, or [the error body])."""
    body = json.dumps({"messages": messages}).encode() if not isinstance(messages, bytes) else messages
    status, out = request(port, "POST", "/api/chat", body, {"Content-Type": "application/json"} | (headers or {}))
    return status, [json.loads(line) for line in out.splitlines() if line]


def user(*parts) -> dict:
    return {
        "role": "user",
        "parts": [{"type": "media", "id": p[1:]} if p.startswith("@") else {"type": "text", "text": p} for p in parts],
    }


def test_chat_answers_a_conversation_with_uploads(server):
    status, info = request(server, "GET", "/api/info")
    assert status == 200 and [a["kind"] for a in json.loads(info)["adapters"]] == ["image", "speech"]
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(png, format="PNG")
    status, got = upload(server, png.getvalue(), "photo.png")
    assert status == 200 and got["kind"] == "image" and got["name"] == "photo.png" and len(got["id"]) == 32
    status, heard = upload(server, wav_bytes(0.5), "q.wav")
    assert status == 200 and heard["kind"] == "speech" and heard["id"] != got["id"]
    history = [user("@" + got["id"], "What is it?"), {"role": "assistant", "parts": [{"type": "text", "text": "A"}]}]
    status, lines = chat(server, [*history, user("@" + heard["id"])])
    assert status == 200 and lines[-1]["done"] is True and isinstance(lines[-1]["text"], str), lines
    assert all("delta" in x for x in lines[:-1])


def test_chat_errors_name_what_is_wrong(server):
    assert chat(server, b"{not json")[0] == 400
    assert chat(server, [])[0] == 400
    status, body = chat(server, [user("@" + "ab" * 16)])
    assert status == 422 and "ab" * 16 in body[0]["error"] and "attach the file again" in body[0]["error"]
    status, body = chat(server, [user("@../../etc/passwd")])
    assert status == 400 and "../../etc/passwd" in body[0]["error"]
    status, body = chat(server, [{"role": "assistant", "parts": [{"type": "text", "text": "hi"}]}])
    assert status == 400 and "last message" in body[0]["error"]
    status, body = chat(server, [{"role": "system", "parts": [{"type": "text", "text": "x"}]}, user("hi")])
    assert status == 400 and "messages[0]" in body[0]["error"]
    status, body = chat(server, [{"role": "user", "parts": [{"type": "image", "path": "/etc/passwd"}]}])
    assert status == 400 and "messages[0].parts[0]" in body[0]["error"]
    assert chat(server, [user("hi")], {"Content-Type": "text/plain"})[0] == 415
    head = "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
    assert raw_status(server, head) == 411
    assert raw_status(server, head + f"\r\nContent-Length: {10**7}") == 413
    status, body = chat(server, [user("word " * 10000)])  # longer than the tower's context with the answer
    assert status == 413 and "start anew" in body[0]["error"]


def refuses_bad_files(server, send) -> None:
    """A file of a type no adapter reads: 415; one that does not decode or is too short: 422 naming why (the same
    checks on /api/process and /api/upload)."""
    status, body = send(server, b"hello", "notes.txt")
    assert status == 415 and "unknown file type" in body["error"]
    status, body = send(server, b"\x89PNG garbage", "broken.png")
    assert status == 422 and "broken.png" in body["error"]
    status, body = send(server, wav_bytes(0.01), "tiny.wav")
    assert status == 422 and "too short" in body["error"]


def test_upload_errors(server):
    refuses_bad_files(server, upload)
    head = "POST /api/upload HTTP/1.1\r\nHost: localhost\r\nX-Filename: a.png"
    assert raw_status(server, head + f"\r\nContent-Length: {10**7}") == 413


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/info"), ("POST", "/api/upload"), ("POST", "/api/chat")])
@pytest.mark.parametrize(
    "header", [{"Host": "evil.example.com"}, {"Origin": "http://evil.example.com"}, {"Origin": "null"}]
)
def test_chat_endpoints_refuse_other_sites(server, method, path, header):
    h = {"X-Filename": "a.png", "Content-Type": "application/json"} | header
    assert request(server, method, path, b"{}", h)[0] == 403
