"""`mm-llama ask` / `mm-llama chat`: one user turn with an image and a spoken question together, the tower found
from what the adapter files record, the answer alone on the last stdout line (the contract), equal to the library's
answer of the same conversation."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from mm_llama.adapters.files import load_composed, read_adapter_meta
from mm_llama.adapters.generation import generate_items
from mm_llama.adapters.samples import Samples
from mm_llama.cli import main as cli_main
from mm_llama.data.conversation import Message, Part
from mm_llama.data.media import AUDIO, IMAGE
from mm_llama.llama import Tokenizer, load_source
from recipes.train import main as train_main
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]


def run(main, *argv, stdin: str = ""):
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.chdir(ROOT),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An image and a speech adapter trained (1 step) on the same random debug tower by the recipe."""
    tmp = tmp_path_factory.mktemp("ask")
    files = []
    for kind in ("image", "speech"):
        argv = ["--config", f"recipes/configs/debug_{kind}.yaml", f"run_dir={tmp / kind}", "steps=1"]
        code, _, err = run(train_main, *argv, "ckpt_every=1", "tensorboard=false")
        assert code == 0, err
        files.append(str(tmp / kind / "adapter.safetensors"))
    photo = tmp / "chelsea.png"
    Image.fromarray(skdata.chelsea()).resize((64, 48)).save(photo)
    question = tmp / "question.wav"
    question.write_bytes(tiny.wav_bytes(0.8, 330))
    return files, str(photo), str(question)


def test_adapter_files_record_their_tower(adapters):
    files, _, _ = adapters
    sources = [read_adapter_meta(f)["sources"] for f in files]
    want = {"tower": "preset:debug?vocab_size=49152&seed=0", "tokenizer": "asset:smollm2_gguf"}
    assert sources[0] == sources[1] == want


def test_ask_an_image_and_a_spoken_question_in_one_turn(adapters, smollm_path):
    files, photo, question = adapters
    argv = ["ask", "--adapter", files[0], "--adapter", files[1], photo, question, "--prompt", "Answer:"]
    code, out, err = run(cli_main, *argv, "--max-new-tokens", "5", "--system", "Be brief.")
    assert code == 0, err
    got = out.rstrip("\n").splitlines()[-1]
    # the library's answer to the same conversation
    model = load_composed(load_source("preset:debug?vocab_size=49152&seed=0"), files)
    tok = Tokenizer.from_pretrained(smollm_path)
    img = IMAGE.decode(Path(photo).read_bytes(), photo, "png")
    wave = AUDIO.decode(Path(question).read_bytes(), question, "wav")
    msgs = [
        Message("system", [Part("text", "Be brief.")]),
        Message("user", [Part("image", ref=img), Part("audio", ref=wave), Part("text", "Answer:")]),
    ]
    request = Samples.of(model, tok).request(msgs)
    assert request["input_ids"][:1] == [tok.token_to_id("<|im_start|>")]  # SmolLM2's ChatML
    (want,) = generate_items(model, tok, [request], max_new_tokens=5)
    assert got == " ".join(want.split())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ask_in_each_tower_precision(adapters, dtype):
    files, photo, question = adapters
    argv = ["ask", "--adapter", files[0], "--adapter", files[1], photo, question, "--dtype", dtype]
    code, out, err = run(cli_main, *argv, "--prompt", "Answer:", "--max-new-tokens", "3")
    assert code == 0 and out.strip(), err


def test_chat_keeps_history_and_attachments(adapters):
    files, photo, _ = adapters
    stdin = f"/attach {photo}\nWhat is this?\nAnd again?\n/quit\n"
    code, out, err = run(cli_main, "chat", "--adapter", files[0], "--max-new-tokens", "3", stdin=stdin)
    assert code == 0, err
    assert len(out.strip("\n").splitlines()) == 2  # one reply per message


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_streams_in_a_terminal_the_lines_it_prints_piped(adapters):
    """In a terminal `mm-llama chat` writes each answer as it is decoded; the lines are those printed piped."""
    files, photo, _ = adapters
    stdin = f"/attach {photo}\nWhat is this?\nAnd again?\n/quit\n"
    _, piped, _ = run(cli_main, "chat", "--adapter", files[0], "--max-new-tokens", "6", stdin=stdin)
    term, chunks = Terminal(), []
    real_write = term.write
    term.write = lambda text: chunks.append(text) or real_write(text)  # type: ignore[method-assign]
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(term), pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(stdin))
        assert cli_main(["chat", "--adapter", files[0], "--max-new-tokens", "6"]) == 0
    assert term.getvalue() == piped and len([c for c in chunks if c.strip()]) > 2  # token by token


def test_ask_errors_are_clear(adapters, tmp_path):
    files, photo, question = adapters
    code, _, err = run(cli_main, "ask", "--adapter", files[0], question)
    assert code == 2 and "needs a speech adapter" in err
    code, _, err = run(cli_main, "ask", "--adapter", files[0], str(tmp_path / "none.png"))
    assert code == 2 and "no such file" in err
    code, _, err = run(cli_main, "ask", photo)
    assert code == 2 and "give --model" in err
    assert json.loads(json.dumps(read_adapter_meta(files[0])))  # metadata is plain JSON
