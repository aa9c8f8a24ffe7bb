"""`mm-llama serve`: a small local web page where a person drops an image, a video or an audio file and sees the
caption or transcript. Stdlib HTTP server on 127.0.0.1; models are loaded once at start-up.

    mm-llama serve --model TOWER --adapter FILE [--adapter FILE ...]     (image, video, speech: any subset)

The adapters are composed on one tower, as in `mm-llama caption` (adapters/cli.py, adapters/describe.py).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
  const j = await r.json();
  result.innerHTML = '';
  const k = document.createElement('div'); k.className = 'kind'; k.textContent = j.kind || 'error';
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
        from .cli import load_model

        self.args = args
        self.lock = threading.Lock()  # one request at a time on the model
        args.adapter = list(args.adapter or []) + [f for f in (args.video_adapter, args.speech_adapter) if f]
        args.device = "cpu"
        self.model, self.tok = load_model(args)

    def process(self, name: str, data: bytes) -> dict:
        from mm_llama.data.badsamples import SampleError

        from .describe import describe
        from .registry import MODALITIES

        try:
            with self.lock:
                answer = describe(self.model, self.tok, name, data, prompt=self.args.prompt,
                                      frames=self.args.frames, max_new_tokens=self.args.max_new_tokens)  # fmt: skip
        except (SampleError, ValueError) as e:
            return {"error": str(e)}
        return {"kind": MODALITIES[answer.kind].what, "text": answer.text}


def make_handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            if self.path != "/api/process":
                return self._send(404, b"not found", "text/plain")
            from urllib.parse import unquote

            n = int(self.headers.get("Content-Length", 0))
            if n <= 0 or n > app.args.max_upload_mb * 1e6:
                return self._send(413, json.dumps({"error": "empty or too large upload"}).encode(), "application/json")
            name = unquote(self.headers.get("X-Filename", "upload"))
            result = app.process(name, self.rfile.read(n))
            self._send(200, json.dumps(result).encode(), "application/json")

    return Handler


def cmd_serve(args) -> int:
    app = App(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(app))
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
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--prompt", default="")
    s.add_argument("--frames", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--max-upload-mb", type=float, default=200)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.set_defaults(func=cmd_serve)
