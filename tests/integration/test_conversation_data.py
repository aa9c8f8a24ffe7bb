"""Your data in without writing code: chat-style messages, LLaVA, COCO captions and LibriSpeech folders -> shards
(`mm-llama shards write --from FORMAT`), with bad lines counted and named; `mm-llama data preview` shows what the
tower is trained on; the recipe trains on the conversations. Real photos from scikit-image's bundled data set."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from skimage import data as skdata

from mm_llama.cli import main as cli_main
from mm_llama.data.shards import expand_urls, read_samples
from recipes.train import main as train_main
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # bundled with scikit-image (never fetched)


def run(main, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def photos(folder: Path) -> dict[str, str]:
    """The photos as small JPEG/PNG files in `folder`: name -> file name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(PHOTOS):
        fname = f"{name}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 48)).save(folder / fname)
        out[name] = fname
    return out


def write(fmt: str, src: Path, out: Path, *extra):
    code, stdout, stderr = run(
        cli_main, "shards", "write", "--from", fmt, str(src), "--out", str(out), "--quiet", *extra
    )
    return code, json.loads(stdout.splitlines()[-1]), stderr


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def medium(kind: str, path: str, key: str = "path") -> dict:
    return {"type": kind, key: path}


def turn(role: str, *content) -> dict:
    return {"role": role, "content": content[0] if len(content) == 1 and isinstance(content[0], str) else list(content)}


def chat(*turns) -> dict:
    return {"messages": list(turns)}


def gpt(*turns) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def test_messages_jsonl_to_shards_preview_and_training(tmp_path):
    img = {k: f"img/{v}" for k, v in photos(tmp_path / "img").items()}
    lines = [
        chat(
            turn("user", medium("image", img["astronaut"], "image"), text("Who is this?")),
            turn("assistant", "An astronaut."),
        ),
        chat(
            turn("system", "Answer briefly."),
            turn(
                "user",
                text("Compare "),
                medium("image", img["chelsea"]),
                text(" with "),
                medium("image", img["coffee"]),
            ),
            turn("assistant", "A cat and a cup."),
            turn("user", medium("image", img["rocket"]), text("And this?")),
            turn("assistant", text("A rocket.")),
        ),
        chat(turn("user", "Say hi."), turn("assistant", "Hi.")),
        "{not json",
        chat(turn("robot", "x"), turn("assistant", "y")),
        chat(turn("user", medium("image", "img/missing.png")), turn("assistant", "?")),
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    code, summary, stderr = write("messages", src, tmp_path / "shards")
    assert code == 0 and summary["written"] == 3 and summary["skipped"] == 3
    assert summary["reasons"] == {"bad_line": 1, "unknown_role": 1, "missing_file": 1}
    assert f"{src}:4: invalid JSON" in stderr and f"{src}:5: message 0: unknown role 'robot'" in stderr
    assert f"{src}:6: cannot read" in stderr and "missing.png" in stderr
    raw = read_samples(expand_urls(str(tmp_path / "shards/index.json")))
    assert sorted(k for k in raw[1] if not k.startswith("__")) == ["chat.json", "m0.jpg", "m1.png", "m2.jpg"]
    code, out, err = run(cli_main, "shards", "verify", str(tmp_path / "shards/index.json"))
    assert code == 0 and json.loads(out)["bad"] == 0, err

    cfg = ["--config", "recipes/configs/debug_image.yaml", f"data.train={tmp_path / 'shards/index.json'}"]
    code, out, err = run(cli_main, "data", "preview", *cfg, "--n", "3", "data.shuffle_buffer=1")
    assert code == 0, err
    shown = out.split("--- sample ")
    assert "<|im_start|>user\n<image:astronaut.png>Who is this?<|im_end|>" in shown[1]
    assert "<|im_start|>assistant\n[[An astronaut.<|im_end|>]]" in shown[1]
    assert "Compare <image:chelsea.jpg> with <image:coffee.png>" in shown[2] and "[[A rocket.<|im_end|>]]" in shown[2]
    assert "<|im_start|>user\nSay hi.<|im_end|>" in shown[3] and "[[Hi.<|im_end|>]]" in shown[3]

    run_dir = tmp_path / "run"
    code, out, err = run(train_main, *cfg, f"run_dir={run_dir}", "steps=2", "ckpt_every=2", "tensorboard=false")
    assert code == 0, err
    assert (run_dir / "adapter.safetensors").is_file()
    assert all(np.isfinite(json.loads(out.split("LOSSES ")[1])))


def test_llava_json_to_shards(tmp_path):
    img = photos(tmp_path / "images")
    entries = [
        {"id": "a1", "image": img["astronaut"], "conversations": gpt("<image>\nWho is this?", "An astronaut.")},
        {"id": "c2", "image": img["chelsea"], "conversations": gpt("What animal?", "A cat.", "Its colour?", "Brown.")},
        {"id": "t3", "conversations": gpt("2+2?", "4")},
        {"id": "bad", "image": img["coffee"], "conversations": [{"from": "narrator", "value": "<image>"}]},
        {"id": "gone", "image": "nope.jpg", "conversations": gpt("<image>", "?")},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(entries))
    code, summary, stderr = write("llava", src, tmp_path / "shards", "--media-root", str(tmp_path / "images"))
    assert code == 0 and summary["written"] == 3 and summary["reasons"] == {"unknown_role": 1, "missing_file": 1}
    assert f"{src}:3 (id bad): turn 0: unknown speaker 'narrator'" in stderr and "nope.jpg" in stderr
    chats = [
        json.loads(s["chat.json"])["messages"] for s in read_samples(expand_urls(str(tmp_path / "shards/index.json")))
    ]
    assert chats[0][0]["content"][0] == {"type": "image", "member": "m0.png", "name": "astronaut.png"}
    assert chats[0][0]["content"][1] == {"type": "text", "text": "\nWho is this?"}
    assert chats[1][0]["content"][0]["type"] == "image" and [m["role"] for m in chats[1]] == ["user", "assistant"] * 2
    assert chats[2] == [turn("user", text("2+2?")), turn("assistant", text("4"))]
    # the README's next two commands: see what is trained, train
    cfg = ["--config", "recipes/configs/debug_image.yaml", f"data.train={tmp_path / 'shards/index.json'}"]
    code, out, err = run(cli_main, "data", "preview", *cfg, "--n", "2")
    assert code == 0 and out.count("--- sample") == 2 and "[[" in out, err
    code, out, err = run(train_main, *cfg, f"run_dir={tmp_path / 'run'}", "steps=2", "tensorboard=false")
    assert code == 0 and (tmp_path / "run/adapter.safetensors").is_file(), err


def test_coco_and_librispeech_to_shards(tmp_path):
    img = photos(tmp_path / "val2017")
    coco = {
        "images": [{"id": 1, "file_name": img["astronaut"]}, {"id": 2, "file_name": img["rocket"]}],
        "annotations": [
            {"image_id": 1, "caption": "A woman in a space suit."},
            {"image_id": 2, "caption": "A rocket on a pad."},
            {"image_id": 1, "caption": "An astronaut with a flag."},
            {"image_id": 9, "caption": "No such image."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    code, summary, stderr = write(
        "coco", tmp_path / "captions.json", tmp_path / "coco", "--media-root", str(tmp_path / "val2017")
    )
    assert code == 0 and summary["written"] == 2 and summary["reasons"] == {"bad_annotation": 1}
    raw = read_samples(expand_urls(str(tmp_path / "coco/index.json")))
    assert (
        raw[0]["txt"] == b"A woman in a space suit."
        and json.loads(raw[0]["json"])["captions"][1] == "An astronaut with a flag."
    )

    chapter = tmp_path / "LibriSpeech/dev-clean/84/121123"
    chapter.mkdir(parents=True)
    for k, f in enumerate((300, 500)):
        sf.write(chapter / f"84-121123-000{k}.flac", np.sin(np.arange(8000) * f / 16000 * 6.28) * 0.3, 16000)
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN\n84-121123-0002 NO AUDIO\n"
    )
    code, summary, stderr = write("librispeech", tmp_path / "LibriSpeech", tmp_path / "ls")
    assert code == 0 and summary["written"] == 2 and summary["reasons"] == {"missing_file": 1}
    assert "84-121123.trans.txt:3: no audio file 84-121123-0002.flac" in stderr
    raw = read_samples(expand_urls(str(tmp_path / "ls/index.json")))
    assert [s["txt"] for s in raw] == [b"GO DO YOU HEAR", b"BUT IN LESS THAN"] and "flac" in raw[0]


def test_missing_source_is_a_clear_error(tmp_path):
    code, out, err = run(
        cli_main, "shards", "write", "--from", "llava", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "none.json: no such file" in err


@pytest.mark.parametrize("kind", ["video", "speech"])
def test_conversations_with_clips_train_through_the_recipe(tmp_path, kind):
    """A video or speech run reads conversations holding its medium (two clips in one sample included)."""
    kind_of, data = ("video", tiny.video_bytes) if kind == "video" else ("audio", lambda: tiny.wav_bytes(0.6))
    ext = "mp4" if kind == "video" else "wav"
    for i in range(2):
        (tmp_path / f"c{i}.{ext}").write_bytes(data())
    two = turn("user", medium(kind_of, f"c0.{ext}"), text("then"), medium(kind_of, f"c1.{ext}"))
    lines = [chat(two, turn("assistant", "two clips"))] * 2 + [
        chat(turn("user", "no media"), turn("assistant", "ok"))
    ] * 2
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert write("messages", tmp_path / "c.jsonl", tmp_path / "shards")[1]["written"] == 4
    argv = ["--config", f"recipes/configs/debug_{kind}.yaml", f"data.train={tmp_path / 'shards/index.json'}"]
    code, out, err = run(
        train_main, *argv, f"run_dir={tmp_path / 'run'}", "steps=2", "ckpt_every=2", "tensorboard=false"
    )
    assert code == 0, err
    assert all(np.isfinite(json.loads(out.split("LOSSES ")[1])))
