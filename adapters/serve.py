"""`mm-llama serve`: a small local web page where a person drops an image, a video or an audio file and sees the
caption or transcript. Stdlib HTTP server on 127.0.0.1; models are loaded once at start-up.

    mm-llama serve --model TOWER --adapter FILE [--adapter FILE ...]     (image, video, speech: any subset)

The adapters are composed on one tower, as in `mm-llama caption` (adapters/cli.py, adapters/describe.py).

Every request gets an HTTP status that fits: 400 malformed (Content-Length missing or not a number), 403 a Host
header that is not this server's (DNS rebinding against a loopback server), 404, 405 a method other than GET and
POST, 411/413 empty or too large, 415 a file type no loaded adapter handles (before the body is read), 422 a file
that does not decode, 503 all workers busy (with Retry-After), 500 anything else (with a short id, logged with its
traceback). Sockets time out (`--timeout`), at most `--workers` requests are handled at once, and uploads stream
to a temporary file; the model reads it under its lock, one request at a time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from mm_llama.data.badsamples import SampleError
from mm_llama.options import RANGES

from .cli import load_model
from .describe import UnsupportedMedia, check_handled, describe
from .registry import MODALITIES

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mm_llama</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:760px;margin:40px auto;color:#222}
 #drop{border:2px dashed #888;border-radius:12px;padding:48px;text-align:center;background:#fafafa}
 #drop.over{background:#eef6ff;border-color:#36c}
 #result{margin-top:24px;font-size:1.2em;white-space:pre-wrap;min-height:2em}
 .kind{color:#666;font-size:.8em;text-transform:uppercase}
</style></head>
<body>
<h1>mm_llama</h1>
<p>Drop an image, a video or an audio file (or pick one): the frozen Llama tower with its adapters answers.</p>
<div id="drop">Drop a file here<br><br><input type="file" id="file"></div>
<div id="result"></div>
<script>
const drop = document.getElementById('drop'), result = document.getElementById('result');
async function send(file) {
  result.textContent = 'working on ' + file.name + ' ...';
  const r = await fetch('/api/process', {method: 'POST', headers: {'X-Filename': encodeURIComponent(file.name)},
                                          body: file});
  let j;
  try { j = await r.json(); } catch (e) { j = {error: 'HTTP ' + r.status}; }
  result.innerHTML = '';
  const k = document.createElement('div'); k.className = 'kind'; k.textContent = r.ok ? j.kind : 'error';
  const t = document.createElement('div'); t.id = 'text'; t.textContent = j.text || j.error;
  result.appendChild(k); result.appendChild(t);
}
document.getElementById('file').addEventListener('change', e => { if (e.target.files[0]) send(e.target.files[0]); });
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>
"""


class App:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()  # one request at a time on the model
        args.adapter = list(args.adapter or []) + [f for f in (args.video_adapter, args.speech_adapter) if f]
        args.device = "cpu"
        self.model, self.tok = load_model(args)

    def process(self, name: str, path: Path) -> tuple[int, dict]:
        """(HTTP status, JSON body) for an uploaded file, read from its temporary file under the model lock."""
        try:
            check_handled(self.model, name)
        except UnsupportedMedia as e:
            return 415, {"error": str(e)}
        try:
            with self.lock:
                answer = describe(
                    self.model,
                    self.tok,
                    name,
                    path.read_bytes(),
                    prompt=self.args.prompt,
                    frames=self.args.frames,
                    max_new_tokens=self.args.max_new_tokens,
                )
        except SampleError as e:
            return 422, {"error": str(e)}
        except Exception:  # noqa: BLE001 -- a bug or an odd input: logged with an id the page shows
            rid = uuid.uuid4().hex[:8]
            print(f"mm-llama serve: error {rid} on {name!r}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return 500, {"error": f"internal error {rid} (logged by the server)"}
        return 200, {"kind": MODALITIES[answer.kind].inference.what, "text": answer.text}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_allowed(header: str | None, bind_host: str) -> bool:
    """The Host header names this server: a loopback name, or the --host it was started with."""
    if not header:
        return False
    host = header.strip().lower()
    host = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return host in LOOPBACK or host == bind_host.lower()


def make_handler(app: App):
    # long: the request handler class: every HTTP status decided in one place
    class Handler(BaseHTTPRequestHandler):
        timeout = app.args.timeout  # seconds a socket may stall (a slow or stopped upload frees its worker)

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: dict):
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _host_ok(self) -> bool:
            if host_allowed(self.headers.get("Host"), app.args.host):
                return True
            self._json(403, {"error": f"Host {self.headers.get('Host')!r} is not this server"})
            return False

        def do_GET(self):
            if not self._host_ok():
                return
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._json(404, {"error": "not found"})

        def _not_allowed(self):
            self.close_connection = True
            body = json.dumps({"error": f"method {self.command} not allowed (GET, POST)"}).encode()
            self.send_response(405)
            self.send_header("Allow", "GET, POST")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _not_allowed

        def do_POST(self):
            if not self._host_ok():
                return
            if self.path != "/api/process":
                return self._json(404, {"error": "not found"})
            raw = self.headers.get("Content-Length")
            if raw is None:
                return self._json(411, {"error": "Content-Length required"})
            try:
                n = int(raw)
            except ValueError:
                return self._json(400, {"error": f"Content-Length {raw!r} is not a number"})
            limit = int(app.args.max_upload_mb * 1e6)
            if n <= 0 or n > limit:
                self.close_connection = True  # the body is not read
                return self._json(413, {"error": f"upload of {n} bytes: empty or over the {limit}-byte limit"})
            name = Path(unquote(self.headers.get("X-Filename", "upload"))).name or "upload"
            try:  # a file type no adapter reads: 415 before the body is read
                check_handled(app.model, name)
            except UnsupportedMedia as e:
                self.close_connection = True
                return self._json(415, {"error": str(e)})
            with tempfile.TemporaryDirectory(prefix="mm-llama-upload-") as tmp:
                path = Path(tmp) / "upload"
                left = n
                with path.open("wb") as f:
                    while left:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            return self._json(400, {"error": f"upload ended after {n - left} of {n} bytes"})
                        f.write(chunk)
                        left -= len(chunk)
                code, body = app.process(name, path)
            self._json(code, body)

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """A thread per request, at most `workers` at once; the next ones get 503 at once instead of a new thread."""

    daemon_threads = True

    def __init__(self, address, handler, workers: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(workers)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.recv(65536)  # the request head: closing with it unread would reset the connection
                body = b'{"error": "busy: too many requests at once, try again"}'
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        """A client gone mid-request (reset, broken pipe, timeout) is not an error of the server: no traceback."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def cmd_serve(args) -> int:
    app = App(args)
    server = BoundedServer((args.host, args.port), make_handler(app), args.workers)
    print(f"mm_llama serving on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="local web page: drop an image, video or audio file")
    s.add_argument("--model", required=True)
    s.add_argument("--tokenizer", default=None)
    s.add_argument("--adapter", action="append", default=[], help="adapter file (image, video or speech); repeat")
    s.add_argument("--video-adapter", default=None, help="same as another --adapter (kept for old scripts)")
    s.add_argument("--speech-adapter", default=None, help="same as another --adapter (kept for old scripts)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the tower's weights; auto: the dtype the adapters were trained with",
    )
    s.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only tower linears")
    s.add_argument("--prompt", default="")
    s.add_argument("--frames", type=RANGES["frames"], default=8)
    s.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=32)
    s.add_argument("--max-upload-mb", type=RANGES["max_upload_mb"], default=200)
    s.add_argument("--host", default="127.0.0.1", help="bind address (its name is also an allowed Host header)")
    s.add_argument("--workers", type=RANGES["workers"], default=4, help="requests handled at once (the rest get 503)")
    s.add_argument("--timeout", type=RANGES["timeout"], default=30.0, help="seconds a socket may stall")
    s.add_argument("--port", type=RANGES["port"], default=8765)
    s.set_defaults(func=cmd_serve)
