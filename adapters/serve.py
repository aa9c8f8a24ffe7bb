"""`mm-llama serve`: a local chat page. A person talks with the model about images, videos and audio: files picked
or dropped, or speech recorded in the browser, attached to a message; the answer streams in as it is decoded, and
the conversation keeps its history. Stdlib HTTP server on 127.0.0.1; models are loaded once at start-up.

    mm-llama serve --model TOWER --adapter FILE [--adapter FILE ...]     (image, video, speech: any subset)

The adapters are composed on one tower, as in `mm-llama caption` and `mm-llama chat`. Endpoints:

    GET  /                 the chat page (adapters/static/chat.html)
    GET  /api/info         the tower and the loaded adapters (file, kind, medium, extensions)
    POST /api/upload       a file for the chat (X-Filename: its name) -> {"id", "name", "kind"}
    POST /api/chat         {"messages": [...]} (application/json) -> the answer as JSON lines (adapters/serve_chat.py)
    POST /api/process      a file (X-Filename) -> {"kind", "text"}: its caption or transcript, as `mm-llama caption`

The chat answers through adapters/chat.py, the code of `mm-llama ask` and `mm-llama chat`.

Every request gets an HTTP status that fits: 400 malformed (Content-Length not a number, a body that ends early, a
conversation that is not the JSON described), 403 a Host header that is not this server's (DNS rebinding against a
loopback server) or a browser's Origin of another site, 404, 405 a method other than GET and POST, 411/413 empty or
too large (a conversation too long for the tower too), 415 a file type no loaded adapter handles (before the body is
read) or a conversation that is not application/json, 422 a file that does not decode or a media id the server does
not hold, 503 all workers busy (with Retry-After), 500 anything else (with a short id, logged with its traceback;
once an answer streams, as its last line). Sockets time out (`--timeout`), at most `--workers` requests are handled
at once, and uploads stream to a temporary file; the model answers under its lock, one request at a time.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import traceback
import uuid
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mm_llama.data.badsamples import SampleError
from mm_llama.options import RANGES

from .cli import load_model
from .describe import UnsupportedMedia, check_handled, describe
from .files import adapter_kind
from .registry import MODALITIES
from .serve_chat import CHAT_BYTES, Chat, HttpError, parse_chat

CLIENT_GONE = (BrokenPipeError, ConnectionResetError, TimeoutError)


@cache
def page() -> bytes:
    """The chat page (adapters/static/chat.html, shipped as package data)."""
    return (resources.files(__package__) / "static" / "chat.html").read_bytes()


class App:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()  # one request at a time on the model
        args.adapter = list(args.adapter or []) + [f for f in (args.video_adapter, args.speech_adapter) if f]
        args.video_adapter = args.speech_adapter = None  # now in args.adapter (load_model would add them twice)
        args.device = "cpu"
        self.model, self.tok = load_model(args)
        self.upload_limit = int(args.max_upload_mb * 1e6)
        self.tmp = tempfile.TemporaryDirectory(prefix="mm-llama-serve-")  # private (0700); removed by close()
        self.chat = Chat(self.model, self.tok, args, Path(self.tmp.name))
        self.info = self._info()

    def close(self) -> None:
        self.tmp.cleanup()

    def _info(self) -> dict:
        """What GET /api/info tells the page: the tower, each loaded adapter (its file, kind, medium, extensions)."""
        files = {adapter_kind(f): Path(f).name for f in self.args.adapter}
        adapters = [
            {
                "kind": k,
                "file": files.get(k, "(in the tower's checkpoint)"),
                "medium": MODALITIES[k].data.medium.name,
                "answers": MODALITIES[k].inference.what,
                "exts": list(MODALITIES[k].exts),
            }
            for k in self.model.kinds
        ]
        tower = self.args.model if self.args.model.startswith("preset:") else Path(self.args.model).name
        return {"tower": tower, "adapters": adapters, "max_new_tokens": self.args.max_new_tokens}

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
                    language=self.args.language,
                    max_new_tokens=self.args.max_new_tokens,
                )
        except SampleError as e:
            return 422, {"error": str(e)}
        except Exception:  # noqa: BLE001 -- a bug or an odd input: logged with an id the page shows
            return 500, {"error": logged_error(name)}
        return 200, {"kind": MODALITIES[answer.kind].inference.what, "text": answer.text}


def logged_error(what: str) -> str:
    """Log the current exception's traceback with a short id; the message the client gets."""
    rid = uuid.uuid4().hex[:8]
    print(f"mm-llama serve: error {rid} on {what!r}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return f"internal error {rid} (logged by the server)"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_allowed(header: str | None, bind_host: str) -> bool:
    """The Host header names this server: a loopback name, or the --host it was started with."""
    if not header:
        return False
    host = header.strip().lower()
    host = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return host in LOOPBACK or host == bind_host.lower()


class Handler(BaseHTTPRequestHandler):
    """Every HTTP status decided here; `app` is set by make_handler."""

    app: App

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
        """The Host header names this server, and an Origin header (a browser's fetch) is one of its pages."""
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if not host_allowed(host, self.app.args.host):
            self._json(403, {"error": f"Host {host!r} is not this server"})
            return False
        if origin is not None and not host_allowed(urlsplit(origin).netloc, self.app.args.host):
            self._json(403, {"error": f"Origin {origin!r} is not this server"})
            return False
        return True

    def do_GET(self):
        if not self._host_ok():
            return
        if self.path in ("/", "/index.html"):
            self._send(200, page(), "text/html; charset=utf-8")
        elif self.path == "/api/info":
            self._json(200, self.app.info)
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
        route = {"/api/process": self._process, "/api/upload": self._upload, "/api/chat": self._chat}.get(self.path)
        if route is None:
            return self._json(404, {"error": "not found"})
        try:
            route()
        except HttpError as e:
            self._json(e.code, {"error": e.message})
        except CLIENT_GONE:
            raise
        except Exception:  # noqa: BLE001 -- a bug or an odd input: logged with an id the client gets
            self._json(500, {"error": logged_error(self.path)})

    # --- POST bodies ------------------------------------------------------------------------------
    def _length(self, limit: int) -> int:
        """The declared body length: 411 without one, 400 not a number, 413 empty or over `limit`."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "Content-Length required")
        try:
            n = int(raw)
        except ValueError:
            raise HttpError(400, f"Content-Length {raw!r} is not a number") from None
        if n <= 0 or n > limit:
            self.close_connection = True  # the body is not read
            raise HttpError(413, f"a body of {n} bytes: empty or over the {limit}-byte limit")
        return n

    def _filename(self) -> tuple[str, str]:
        """(the file's name, the modality that reads it): 415 before the body is read when no loaded adapter does."""
        name = Path(unquote(self.headers.get("X-Filename", "upload"))).name or "upload"
        try:
            return name, check_handled(self.app.model, name)
        except UnsupportedMedia as e:
            self.close_connection = True
            raise HttpError(415, str(e)) from None

    def _receive(self, path: Path, n: int) -> None:
        """Stream the n-byte body to `path` (400 when it ends early)."""
        left = n
        with path.open("wb") as f:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise HttpError(400, f"upload ended after {n - left} of {n} bytes")
                f.write(chunk)
                left -= len(chunk)

    def _process(self):
        """One file -> its caption or transcript (JSON)."""
        n = self._length(self.app.upload_limit)
        name, _ = self._filename()
        with tempfile.TemporaryDirectory(prefix="mm-llama-upload-") as tmp:
            path = Path(tmp) / "upload"
            self._receive(path, n)
            code, body = self.app.process(name, path)
        self._json(code, body)

    def _upload(self):
        """One file for the chat, checked to decode -> {"id", "name", "kind"}."""
        n = self._length(self.app.upload_limit)
        name, kind = self._filename()
        store = self.app.chat.store
        mid, path = store.reserve()
        try:
            self._receive(path, n)
            self.app.chat.check_upload(name, path)
            store.add(mid, name, kind, path)
        finally:
            path.unlink(missing_ok=True)  # an upload that failed (an added one has moved)
        self._json(200, {"id": mid, "name": name, "kind": kind})

    def _chat(self):
        """A conversation (JSON) -> its next answer, streamed as JSON lines."""
        if self.headers.get_content_type() != "application/json":
            self.close_connection = True
            raise HttpError(415, "send the conversation as application/json")
        n = self._length(CHAT_BYTES)
        body = self.rfile.read(n)
        if len(body) < n:
            raise HttpError(400, f"body ended after {len(body)} of {n} bytes")
        messages = self.app.chat.messages(parse_chat(body))
        with self.app.lock:
            request = self.app.chat.request(messages)
            self._stream(request)

    def _stream(self, request: dict):
        """200, then one JSON line per chunk of text as it is decoded ({"delta"}), then {"done", "text"} (the
        answer as `mm-llama ask` prints it), or {"error"} if answering fails."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.close_connection = True  # no Content-Length: the body ends when the connection closes

        def emit(obj: dict):
            self.wfile.write(json.dumps(obj).encode() + b"\n")

        try:
            text = self.app.chat.answer(request, lambda chunk: chunk and emit({"delta": chunk}))
        except CLIENT_GONE:
            raise
        except Exception:  # noqa: BLE001 -- the status is sent: the error goes in the stream
            emit({"error": logged_error("/api/chat")})
        else:
            emit({"done": True, "text": text})


def make_handler(app: App) -> type[Handler]:
    return type("AppHandler", (Handler,), {"app": app, "timeout": app.args.timeout})  # timeout: a socket's stall


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminated server removes its uploads too
    print(f"mm_llama serving on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="local chat page: ask about images, videos and audio (files or recorded)")
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
    s.add_argument("--prompt", default="", help="POST /api/process: the text after the file")
    s.add_argument("--system", default=None, help="the chat: a system message before every conversation")
    s.add_argument("--template", default="auto", choices=["auto", "llama3", "chatml", "plain"])
    s.add_argument("--language", default="English", help="POST /api/process: the language of transcripts")
    s.add_argument("--frames", type=RANGES["frames"], default=8)
    s.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=32)
    s.add_argument("--temperature", type=RANGES["temperature"], default=0.0, help="the chat's sampling (0: greedy)")
    s.add_argument("--top-p", type=RANGES["top_p"], default=1.0)
    s.add_argument("--seed", type=RANGES["seed"], default=None)
    s.add_argument("--max-upload-mb", type=RANGES["max_upload_mb"], default=200)
    s.add_argument("--host", default="127.0.0.1", help="bind address (its name is also an allowed Host header)")
    s.add_argument("--workers", type=RANGES["workers"], default=4, help="requests handled at once (the rest get 503)")
    s.add_argument("--timeout", type=RANGES["timeout"], default=30.0, help="seconds a socket may stall")
    s.add_argument("--port", type=RANGES["port"], default=8765)
    s.set_defaults(func=cmd_serve)
