"""`mm-llama serve` end to end in headless Chromium: the chat page lists the loaded adapters; an image picked with a
question, a follow-up, then (in a new conversation) a dropped audio file and a clip recorded in the browser are
answered, streamed token by token, with the answers `mm-llama ask` / `chat` give (adapters/chat.py, greedy)."""

import argparse
import base64
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mm_llama.adapters.chat import answer, media_part, samples_for
from mm_llama.adapters.files import load_composed
from mm_llama.data.conversation import Message, Part
from mm_llama.llama import Tokenizer
from tests import tiny
from tests.ddp_helpers import free_port

NEW_TOKENS = 4


QUESTION, FOLLOW_UP = "What is the capital of France?", "And of Italy?"


@pytest.fixture()
def server(tmp_path, smollm_path, smollm):
    """(page URL, folder, the answers adapters/chat.py gives to the test's turns: computed while the server loads)."""
    files = tiny.adapter_files(smollm, tmp_path, ["image", "speech"], gates=0.0)
    image, tone = tmp_path / "red.png", tmp_path / "tone.wav"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(image)
    tone.write_bytes(tiny.wav_bytes(0.8, 330))
    port = free_port()
    argv = ["serve", "--model", str(smollm_path), "--adapter", str(files["image"]), "--adapter", str(files["speech"])]
    argv += ["--port", str(port), "--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mm-llama"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ref = Reference(smollm, smollm_path, files)
    first = ref([("user", [image, QUESTION])])
    want = {
        "first": first,
        "follow": ref([("user", [image, QUESTION]), ("assistant", [first]), ("user", [FOLLOW_UP])]),
        "tone": ref([("user", [tone])]),
    }
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
    yield url, tmp_path, want
    proc.terminate()
    proc.wait(timeout=30)


class Reference:
    """The answers of adapters/chat.py (what `mm-llama ask` / `chat` print) on the same tower and adapter files."""

    def __init__(self, smollm, smollm_path, files):
        self.model = load_composed(smollm, [files["image"], files["speech"]])
        self.tok = Tokenizer.from_pretrained(smollm_path)
        self.args = argparse.Namespace(template="auto", prompt="", frames=8, language="English")
        self.args.__dict__ |= {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "top_p": 1.0, "seed": None}
        self.samples = samples_for(self.model, self.tok, self.args)

    def __call__(self, turns: list[tuple[str, list]]) -> str:
        """turns: (role, [file path or text, ...])."""
        messages = [Message(role, [self.part(x) for x in parts]) for role, parts in turns]
        return answer(self.model, self.tok, self.samples, messages, self.args)

    def part(self, x) -> Part:
        return media_part(self.model, self.samples, str(x)) if isinstance(x, Path) else Part("text", x)


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
        "--use-fake-device-for-media-stream",  # a microphone that beeps, for the Record button
        "--use-fake-ui-for-media-stream",  # its permission granted
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0)), dt = new DataTransfer();
dt.items.add(new File([bytes], arguments[1]));
document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


class Page:
    def __init__(self, drv):
        self.drv, self.wait = drv, WebDriverWait(drv, 60)

    def attached(self, n: int) -> list[str]:
        """Wait for n uploaded attachments; their chips' text."""
        self.wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending .chip[data-id]")) == n)
        return [c.text for c in self.drv.find_elements(By.CSS_SELECTOR, "#pending .chip")]

    def ask(self, text: str = "") -> tuple[str, int]:
        """Send the message; wait for the answer: (its text, how many deltas streamed into its bubble)."""
        done = len(self.drv.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
        self.drv.find_element(By.ID, "question").send_keys(text)
        self.drv.find_element(By.ID, "send").click()
        self.wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == done + 1)
        bubble = self.drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert "error" not in bubble.get_attribute("class"), bubble.text
        text = self.drv.execute_script("return arguments[0].querySelector('.text').textContent", bubble)
        return text, int(bubble.get_attribute("data-deltas") or 0)


def test_chat_page(server):
    url, tmp, want = server
    drv = browser()
    try:
        drv.get(url)
        page = Page(drv)
        assert "mm_llama" in drv.title
        page.wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters li")) == 2)
        listed = drv.find_element(By.ID, "adapters").text
        assert "image.safetensors" in listed and "speech.safetensors" in listed and "png" in listed

        drv.find_element(By.ID, "file").send_keys(str(tmp / "red.png"))  # the file picker
        assert page.attached(1) == ["image: red.png\u00d7"]
        first, deltas = page.ask(QUESTION)
        assert deltas > 1 and first == want["first"] != ""
        assert page.ask(FOLLOW_UP)[0] == want["follow"]  # the history was sent

        drv.find_element(By.ID, "new").click()
        assert drv.find_elements(By.CSS_SELECTOR, ".msg") == []
        wav = base64.b64encode((tmp / "tone.wav").read_bytes()).decode()
        drv.execute_script(DROP, wav, "tone.wav")  # drag and drop
        assert page.attached(1) == ["speech: tone.wav\u00d7"]
        assert page.ask()[0] == want["tone"]  # no text: the clip alone, in a new conversation

        drv.find_element(By.ID, "record").click()  # the fake microphone, converted to WAV in the page
        time.sleep(1.0)
        drv.find_element(By.ID, "record").click()
        assert page.attached(1) == ["speech: recording-1.wav\u00d7"]
        page.ask("What did you hear?")
        assert len(drv.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    finally:
        drv.quit()
