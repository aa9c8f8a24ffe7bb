"""`mm-llama serve` under concurrent load on loopback.

The server runs as its command does (a separate process), with an image adapter on the debug tower (a 1-step run
of the debug image config, made once into --work) and its limits as configured (--workers, --timeout,
--max-upload-mb). N client threads send requests for a bounded time. The mix: valid PNG uploads; the page;
uploads over the size limit; malformed Content-Length; a file type no adapter reads; a foreign Host header; a PUT;
and slow bodies that stall past the server's timeout. Each kind has its documented statuses. Any of them may also
get 503 (with Retry-After) when every worker is busy, and a slow body's connection is closed by the server. Anything
else is unexpected: another status, a reset, a refused connection. The server must stay up and answer a valid
upload at the end. Its resident memory is sampled throughout.

Usage: python benchmarks/serve_load.py [--clients 16] [--seconds 60] [--workers 4] [--timeout 2]
Last line (JSON): requests, errors_unexpected, p50_ms, p99_ms, rss_growth_mb (+ per-kind statuses, the rest).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from mm_llama.adapters.files import read_adapter_meta

EXPECTED = {  # kind -> the statuses it may get (besides 503 when every worker is busy)
    "valid": {200},
    "page": {200},
    "oversized": {413},
    "malformed": {400},
    "wrong_type": {415},
    "bad_host": {403},
    "put": {405},
    "slow": {"closed", 400},  # the server's timeout closes the stalled socket (or it reports the short body)
}
MIX = ["valid"] * 6 + ["page", "oversized", "malformed", "wrong_type", "bad_host", "put", "slow"]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (seed * 37 % 255, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def make_adapter(work: Path) -> Path:
    """A debug-tower image adapter (one training step), made once."""
    run = work / "adapter-run"
    if not (run / "adapter.safetensors").is_file():
        cmd = [sys.executable, "-m", "recipes.train", "--config", "debug_image", f"run_dir={run}", "steps=1"]
        subprocess.run([*cmd, "tensorboard=false"], check=True, capture_output=True, cwd=Path(__file__).parents[1])
    return run / "adapter.safetensors"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, kind: str, i: int, timeout_s: float, max_mb: float) -> tuple[object, float]:
    """(status or "closed", seconds) of one request of `kind`."""
    t0 = time.perf_counter()
    head = {"Host": f"127.0.0.1:{port}"}
    if kind in ("page", "put", "bad_host"):
        method, path, body = ("PUT" if kind == "put" else "GET"), "/", b""
        head["Host"] = "evil.example" if kind == "bad_host" else head["Host"]
    else:
        method, path, body = "POST", "/api/process", png(i)
        head |= {"X-Filename": "x.txt" if kind == "wrong_type" else f"x{i}.png"}
    if kind == "oversized":
        head["Content-Length"], body = str(int(max_mb * 1e6) + 1), b""  # refused before any body is sent
    elif kind == "malformed":
        head["Content-Length"], body = "twelve", b""
    elif kind == "wrong_type":
        head["Content-Length"], body = str(len(body)), b""  # refused on its name, before the body
    elif body or method != "GET":
        head["Content-Length"] = str(len(body))
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s * 4 + 30)
    try:
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "Connection: close"]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if kind == "slow":
            s.sendall(body[: len(body) // 2])  # then stall past the server's timeout
        elif body:
            s.sendall(body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return "closed", time.perf_counter() - t0
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status == 503:
            while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
                data += chunk
            if b"retry-after:" not in data.lower():
                return "503 without Retry-After", time.perf_counter() - t0
        return status, time.perf_counter() - t0
    finally:
        s.close()


def client(port, idx, until, args, results, lock):
    i = idx
    while time.perf_counter() < until:
        kind = MIX[i % len(MIX)]
        i += args.clients
        try:
            status, dt = request(port, kind, i, args.timeout, args.max_upload_mb)
        except OSError as e:  # a reset or a refused connection: never expected
            status, dt = f"{type(e).__name__}", 0.0
        with lock:
            results.append((kind, status, dt))
        if status == 503:  # busy: back off, as Retry-After asks (shortened: the run is bounded)
            time.sleep(args.backoff)


def start_server(args, adapter: Path) -> tuple[subprocess.Popen, int]:
    meta = read_adapter_meta(adapter)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mm-llama"), "serve", "--model", meta["sources"]["tower"]]
    cmd += ["--tokenizer", meta["sources"]["tokenizer"], "--adapter", str(adapter), "--port", str(port)]
    cmd += ["--workers", str(args.workers), "--timeout", str(args.timeout), "--max-new-tokens", "4"]
    cmd += ["--max-upload-mb", str(args.max_upload_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server died: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.2)
    raise RuntimeError("the server did not start in 120 s")


def main() -> int:
    # long: a benchmark reads top to bottom: the server, the load, the figures
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--max-upload-mb", type=float, default=1.0)
    ap.add_argument("--backoff", type=float, default=0.25, help="seconds a client waits after a 503")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mm_llama_serve_load"))
    args = ap.parse_args()
    adapter = make_adapter(Path(args.work))
    proc, port = start_server(args, adapter)
    try:
        status, _ = request(port, "valid", 0, args.timeout, args.max_upload_mb)  # warm-up
        assert status == 200, f"warm-up answered {status}"
        rss = [rss_mb(proc.pid)]
        results, lock, stop = [], threading.Lock(), threading.Event()

        def sample():
            while not stop.wait(0.5):
                rss.append(rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        until = time.perf_counter() + args.seconds
        threads = [
            threading.Thread(target=client, args=(port, c, until, args, results, lock)) for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        sampler.join()
        time.sleep(args.timeout + 1)  # the stalled sockets' threads end
        final, _ = request(port, "valid", 1, args.timeout, args.max_upload_mb)
        rss_end = rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[1]
    by_kind: dict = defaultdict(Counter)
    unexpected = 0
    for kind, status, _ in results:
        by_kind[kind][str(status)] += 1
        unexpected += status not in EXPECTED[kind] | {503}
    lat = sorted(dt * 1000 for kind, status, dt in results if kind != "slow" and isinstance(status, int))
    valid = by_kind["valid"]
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    out = {
        "requests": len(results),
        "errors_unexpected": unexpected + (final != 200) + (not alive),
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(p99, 1),
        "rss_growth_mb": round(rss_end - rss[0], 1),
        "rss_start_mb": round(rss[0], 1),
        "rss_max_mb": round(max(rss), 1),
        "valid_served_fraction": round(valid["200"] / max(sum(valid.values()), 1), 3),
        "final_status": final,
        "server_alive": alive,
        "tracebacks_in_log": log.count("Traceback"),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "clients": args.clients,
        "seconds": args.seconds,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "cpu": platform.processor() or platform.machine(),
    }
    print(
        f"{out['requests']} requests from {args.clients} clients in {args.seconds:.0f} s, {args.workers} workers: "
        f"unexpected {out['errors_unexpected']}, p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, RSS "
        f"{out['rss_start_mb']} -> {rss_end:.1f} MB (max {out['rss_max_mb']})"
    )
    print(json.dumps(out))
    return 0 if out["errors_unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
