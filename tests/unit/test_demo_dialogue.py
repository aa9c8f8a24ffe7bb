"""The demo's dialogue world (recipes/demo/dialogue.py): every answer follows from the picture or clip it is about,
the held-out set keeps its phrasings, pictures and voices apart, and answers are compared by their words."""

import json

import numpy as np
import pytest

from recipes.demo import dialogue
from recipes.demo.corpora import ESPEAK_TEST_VOICES
from recipes.demo.dialogue import PHRASES, Asker, item_phrase, right
from recipes.demo.scenes import FASHION_CLASSES, POSITIONS


def test_answers_follow_from_the_layout():
    ask = Asker(np.random.default_rng(0), "train")
    layout = {0: 5, 3: 8}  # a sandal at the top left, a bag at the bottom right
    seen = set()
    for _ in range(300):
        q, a = ask.about_image(layout)
        seen.add(a)
        if "how many" in q:
            assert a == "two"
        elif q.startswith(("is there", "do you see")):
            assert a == ("yes" if ("sandal" in q or " bag" in q) else "no")
        elif q.startswith("where"):
            assert a in ("at the top left", "at the bottom right") and (("sandal" in q) == (a == "at the top left"))
        else:
            pos = next(p for p in POSITIONS if p in q)
            there = {"top left": "a sandal", "bottom right": "a bag"}.get(pos, "nothing")
            assert a == f"at the {pos} there is {there}"
    assert {"two", "yes", "no", "at the top right there is nothing", "at the top left there is a sandal"} <= seen
    assert ask.about_two({0: 5}, {0: 5, 1: 7}) in {
        (q, "the second") for t in PHRASES["which"][0] + PHRASES["more"][0] for q in [t.format(item="sneaker")]
    }
    assert ask.about_two({0: 5, 1: 7}, {2: 7, 3: 5}) is None  # the same items, the same count: nothing to ask
    assert ask.about_clip(7, "up")[1] in ("it moves up", "a sneaker")


def test_answers_are_compared_by_their_words():
    assert right("A T-shirt.", "a T-shirt") and right("  the first ", "the first")
    assert not right("a shirt", "a T-shirt") and not right("", "no")
    assert item_phrase(FASHION_CLASSES.index("ankle boot")) == "an ankle boot"


@pytest.mark.parametrize("split", ["train", "test"])
def test_phrasings_and_voices_by_split(split):
    recs = dialogue.plan(split, dict.fromkeys(dialogue.KINDS, 40), seed=3)
    only = dialogue._test_only()
    used = {r["question"] in only for r in recs if r["kind"] != "spoken"}
    assert used == ({True, False} if split == "test" else {False})
    assert not any(r["question"] in only for r in recs if r["kind"] == "spoken")
    voices = {r["voice"][1] for r in recs if r["kind"] == "spoken"}
    assert (voices <= set(ESPEAK_TEST_VOICES)) == (split == "test")
    assert all(r["kind"] != "two_images" or len(r["media"]) == 2 for r in recs)
    # media never stand side by side in a turn (adapters/chat.py user_turn: the first picture's text sees it alone)
    turn = next(dialogue.training_records([r for r in recs if r["kind"] == "two_images"]))["messages"][0]
    assert [p.kind for p in turn.parts] == ["image", "text", "image", "text"] and turn.parts[1].text == "\n"


def test_the_held_out_file_is_what_ask_takes(tmp_path):
    recs = dialogue.plan("test", {"image": 2, "spoken": 2, "video": 1, "two_images": 1}, seed=1)
    for r in recs:  # no synthesis here: a stand-in for the spoken question's audio
        if r["kind"] == "spoken":
            r["files"][r["audio_name"]] = b"RIFF"
    lines = dialogue.read_test_set(dialogue.write_test_set(recs, tmp_path))
    assert [set(x) for x in lines] == [{"kind", "media", "question", "answer"}] * len(recs)
    for x in lines:
        assert all((tmp_path / m.rsplit("/", 1)[-1]).exists() for m in x["media"])
        ends = {"spoken": ".wav", "video": ".mp4"}.get(x["kind"], ".png")
        assert x["media"][-1].endswith(ends) and len(x["media"]) == (2 if x["kind"] in ("spoken", "two_images") else 1)
    assert json.loads((tmp_path / "dialogue_test.jsonl").read_text().splitlines()[0])["kind"] == "image"


def test_every_phrasing_is_recognised():
    for key, pools in PHRASES.items():
        for t in pools[0] + pools[1]:
            q = t.format(pos="top left", item="bag", a="a bag")
            assert dialogue.question_key(q) == key or (key, dialogue.question_key(q)) == ("followup", "cell"), q
