"""The user-facing entry points, `mm-llama caption|asr` and the web page, answer every modality and the composed
call (three adapters, three files, one tower) on adapters trained on an fp32 AND on a bf16 tower, with the tower
in every dtype `--dtype` offers (auto: the dtype the adapter files record)."""

import argparse
import copy

import pytest
import torch

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import save_part
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.samples import plain_requests
from mm_llama.adapters.serve import App
from mm_llama.cli import build_parser, main
from mm_llama.data.collate import build_example
from mm_llama.data.media import AUDIO, IMAGE, VIDEO
from mm_llama.llama import save_meta
from tests import tiny

DTYPES = ["auto", "float32", "bfloat16", "float16"]
KINDS = ("image", "video", "speech")


def train_one_step(model: ComposedModel, tok, media: dict, dtype: torch.dtype) -> None:
    """One AdamW step of every part on one sample each, the tower in `dtype` (bf16: under autocast, as training)."""
    items = [
        *plain_requests(model, tok, "image", [IMAGE.decode(media["png"], "x.png")], "x.png", AnswerOptions()),
        *plain_requests(
            model, tok, "video", [VIDEO.decode(media["mp4"], "x.mp4", num_frames=4, size=28)], "x.mp4", AnswerOptions()
        ),
        *plain_requests(model, tok, "speech", [AUDIO.decode(media["wav"], "x.wav", "wav")], "x.wav", AnswerOptions()),
    ]
    items = [{**it, **build_example(it["input_ids"], tok.encode(" a caption") + [tok.eos_id])} for it in items]
    batch = Collate(model.kinds)(items)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model(**batch).loss.backward()
    opt.step()
    model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm_tok, smollm_path):
    """A tiny tower with SmolLM2's vocabulary as a Meta checkpoint, SmolLM2's tokenizer, a picture, a clip and a
    spoken clip as files, and adapter files trained one step on an fp32 and on a bf16 tower."""
    folder = tmp_path_factory.mktemp("entry")
    tower = tiny.tower(n_layers=4, vocab_size=49152)  # SmolLM2's vocabulary
    save_meta(tower, folder / "tower")
    media = {"png": tiny.png_bytes(), "mp4": tiny.video_bytes(), "wav": tiny.wav_bytes(0.6)}
    files = {ext: folder / f"input.{ext}" for ext in media}
    for ext, path in files.items():
        path.write_bytes(media[ext])
    adapters = {}
    for trained, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        t = copy.deepcopy(tower).to(dt)
        model = ComposedModel(t, tiny.parts(t))
        train_one_step(model, smollm_tok, media, dt)
        (folder / trained).mkdir()
        adapters[trained] = {k: folder / trained / f"{k}.safetensors" for k in KINDS}
        for kind, path in adapters[trained].items():
            save_part(model, kind, path)
    return {"tower": str(folder / "tower"), "tok": str(smollm_path), "files": files, "adapters": adapters}


def caption(setup, trained, dtype, kinds, files, capsys):
    flags = [x for k in kinds for x in ("--adapter", str(setup["adapters"][trained][k]))]
    argv = ["caption", "--model", setup["tower"], "--tokenizer", setup["tok"], *flags, *map(str, files)]
    rc = main([*argv, "--dtype", dtype, "--frames", "4", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.splitlines(), err


@pytest.mark.parametrize("trained", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cli_composed_call(setup, trained, dtype, capsys):
    files = list(setup["files"].values())
    lines, err = caption(setup, trained, dtype, KINDS, files, capsys)
    assert [ln.split(": ", 1)[0] for ln in lines] == list(map(str, files))  # `PATH: TEXT`, one line each
    assert f"on a {trained if dtype == 'auto' else dtype} tower" in err


@pytest.mark.parametrize("trained", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_web_page_answers_every_modality(setup, trained, dtype, tmp_path):
    argv = ["serve", "--model", setup["tower"], "--tokenizer", setup["tok"], "--dtype", dtype, "--max-new-tokens", "3"]
    argv += [x for k in KINDS for x in ("--adapter", str(setup["adapters"][trained][k]))]
    app = App(build_parser().parse_args(argv))
    assert app.model.tower.tok_embeddings.weight.dtype == getattr(torch, trained if dtype == "auto" else dtype)
    assert all(p.dtype == torch.float32 for p in app.model.parameters() if p not in set(app.model.tower.parameters()))
    for path, what in zip(setup["files"].values(), ("caption", "video caption", "transcript"), strict=True):
        status, body = app.process(path.name, path)
        assert status == 200 and body["kind"] == what and isinstance(body["text"], str), body


def test_web_page_takes_the_old_adapter_options(setup):
    """--video-adapter / --speech-adapter are more --adapter files (each loaded once)."""
    files = setup["adapters"]["float32"]
    argv = ["serve", "--model", setup["tower"], "--tokenizer", setup["tok"], "--adapter", str(files["image"])]
    argv += ["--video-adapter", str(files["video"]), "--speech-adapter", str(files["speech"])]
    app = App(build_parser().parse_args(argv))
    assert app.model.kinds == list(KINDS) and [a["kind"] for a in app.info["adapters"]] == list(KINDS)
    app.close()


@pytest.mark.parametrize("trained", ["float32", "bfloat16"])
def test_one_adapter_per_call_equals_the_composed_call(setup, trained, capsys):
    """Each file's answer in the three-adapter call is the answer of a call with only its adapter(s)."""
    files = list(setup["files"].values())
    composed, _ = caption(setup, trained, "auto", KINDS, files, capsys)
    for path, kinds in zip(files, (["image"], ["image", "video"], ["speech"]), strict=True):
        (alone,), _ = caption(setup, trained, "auto", kinds, [path], capsys)
        assert alone in composed


def test_speech_cli_is_asr(setup, capsys):
    args = ["asr", "--model", setup["tower"], "--tokenizer", setup["tok"], str(setup["files"]["wav"])]
    rc = main([*args, "--adapter", str(setup["adapters"]["float32"]["speech"]), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith(str(setup["files"]["wav"]) + ":") and "real-time factor" in err
    assert isinstance(build_parser().parse_args(["asr", "--model", "m", "x.wav"]), argparse.Namespace)
