"""`mm-llama serve` end to end in headless Chromium: drop an image and an audio file, read the answers."""

import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests import tiny
from tests.ddp_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def server(tmp_path, smollm_path, smollm):
    files = tiny.adapter_files(smollm, tmp_path, ["image", "speech"], gates=0.0)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "red.png")
    shutil.copy(ROOT / "tests" / "assets" / "make_assets.py", tmp_path / "not_media.py")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mm-llama"),
            "serve",
            "--model",
            str(smollm_path),
            "--adapter",
            str(files["image"]),
            "--speech-adapter",
            str(files["speech"]),
            "--port",
            str(port),
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
    yield url, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail(
            "Chromium and chromedriver are required (Debian packages chromium chromium-driver; make test "
            "installs them when run as root)"
        )

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_drop_image_and_audio_in_the_browser(server):
    url, tmp = server
    audio = ROOT / "tests" / "assets" / "shards" / "audio"

    with tarfile.open(audio / "shard-000000.tar") as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".flac"))
        (tmp / "tone.flac").write_bytes(tf.extractfile(member).read())
    drv = browser()
    try:
        drv.get(url)
        assert "mm_llama" in drv.title
        results = {}
        for f in ("red.png", "tone.flac", "not_media.py"):
            drv.find_element(By.ID, "file").send_keys(str(tmp / f))
            WebDriverWait(drv, 120).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#result .kind")))
            results[f] = (drv.find_element(By.CSS_SELECTOR, "#result .kind").text, drv.find_element(By.ID, "text").text)
            drv.execute_script(
                "document.getElementById('result').innerHTML=''; document.getElementById('file').value='';"
            )
        drv.save_screenshot(str(tmp / "page.png"))
    finally:
        drv.quit()
    assert results["red.png"][0].lower() == "caption" and "Paris" in results["red.png"][1]  # zero gates
    assert results["tone.flac"][0].lower() == "transcript"
    assert results["not_media.py"][0].lower() == "error" and "unknown file type" in results["not_media.py"][1]
