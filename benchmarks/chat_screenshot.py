"""A screenshot of `mm-llama serve`'s chat page for the docs: the server started as its command starts it, a real
exchange in headless Chromium (an image with a question, then an audio clip with an optional text), the whole page
saved as a PNG.

    python benchmarks/chat_screenshot.py --adapter image.safetensors --adapter speech.safetensors \\
        --image photo.jpg --question "What is in the picture?" --audio question.wav --out docs/img/chat.png

--model defaults to the tower the adapter files record (as in `mm-llama ask`). Needs Chromium and chromedriver
(Debian: chromium chromium-driver). Prints each answer; exits 1 if the page shows an error.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mm_llama.adapters.chat import fill_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`mm-llama serve` on a free port; (the process, the page's URL) once it answers."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mm-llama"), "serve", "--model", args.model, "--port", str(port)]
    cmd += [x for f in args.adapter for x in ("--adapter", f)] + ["--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                log = proc.stderr.read()[-3000:] if proc.stderr else ""
                raise SystemExit(f"mm-llama serve exited: {log}") from None
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"mm-llama serve did not answer within {args.start_timeout} s")


def chromium(width: int, height: int) -> webdriver.Chrome:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        raise SystemExit("needs chromium and chromedriver (Debian packages chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def turn(drv, files: list[str], text: str, timeout: float) -> str:
    """Attach the files, type the text, send; the answer (SystemExit with the page's error if it shows one)."""
    wait = WebDriverWait(drv, timeout)
    done = len(drv.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    for i, f in enumerate(files):
        drv.find_element(By.ID, "file").send_keys(str(Path(f).resolve()))
        wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, "#pending .chip[data-id]")) == n)
    drv.find_element(By.ID, "question").send_keys(text)
    drv.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == done + 1)
    bubble = drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    if "error" in (bubble.get_attribute("class") or "") or drv.find_element(By.ID, "status").text:
        raise SystemExit(f"the page shows an error: {bubble.text} {drv.find_element(By.ID, 'status').text}")
    return drv.execute_script("return arguments[0].querySelector('.text').textContent", bubble)


def exchange(drv, args) -> None:
    drv.find_element(By.ID, "question")  # the page is there
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#adapters li"))
    if args.image or args.question:
        print("answer 1:", turn(drv, [args.image] if args.image else [], args.question, args.turn_timeout))
    if args.audio:
        files = [args.audio_image, args.audio] if args.audio_image else [args.audio]
        print("answer 2:", turn(drv, files, args.audio_question, args.turn_timeout))


def screenshot(drv, out: Path, width: int) -> None:
    """The whole page: the viewport made as tall as the document first."""
    height = drv.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    time.sleep(0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(out))
    print(f"wrote {out} ({width} x {height} pixels)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", action="append", required=True, help="adapter file; repeat")
    p.add_argument("--model", default=None, help="the tower (default: the one the adapter files record)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--image", default=None, help="the first turn's image (with --question)")
    p.add_argument("--question", default="", help="the first turn's text")
    p.add_argument("--audio", default=None, help="the second turn's audio file")
    p.add_argument("--audio-image", default=None, help="an image sent before --audio (a spoken question about it)")
    p.add_argument("--audio-question", default="", help="text sent with --audio (default: none, the clip alone)")
    p.add_argument("--out", type=Path, default=Path("docs/img/chat.png"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--width", type=int, default=900)
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the server to load the model")
    p.add_argument("--turn-timeout", type=float, default=300.0, help="seconds for one answer")
    args = p.parse_args(argv)
    if not (args.image or args.question or args.audio):
        p.error("nothing to ask: give --image/--question and/or --audio")
    for f in [args.image, args.audio, args.audio_image, *args.adapter]:
        if f and not Path(f).is_file():
            p.error(f"{f}: no such file")
    fill_model(args)
    proc, url = start_server(args)
    drv = chromium(args.width, 900)
    try:
        drv.get(url)
        exchange(drv, args)
        screenshot(drv, args.out, args.width)
    finally:
        drv.quit()
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
