"""The demo's dialogue world: questions about its composites and clips, as conversations in the tower's chat format.

Four kinds, each answered in a few words:

  image       one composite + a text question ("what is at the top left?", "how many items are there?", "is there a
              bag?", "where is the sneaker?"); some conversations go on with a follow-up ("and at the bottom
              right?") after the first answer
  two_images  two composites + a question about both ("which picture has the sandal, the first or the second?",
              "which picture has more items?")
  video       a clip + "which way does it move?" / "what moves?"
  spoken      one composite + the image question SPOKEN (an audio part after the picture, no text)

Training conversations use the Fashion-MNIST training images, the training phrasings and the speech stage's training
voices; the held-out set uses the test images, its own composites and clips, phrasings of its own as well as the
training ones (text questions; a spoken question is held out by its voice and its picture), and espeak-ng voices
never used in training. The held-out set is a folder of media
files and `dialogue_test.jsonl`, one question per line as `mm-llama ask` takes it (`test_lines`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mm_llama.adapters.chat import user_turn
from mm_llama.data.conversation import Message, Part
from mm_llama.data.writer import write_shards

from . import corpora, scenes
from .scenes import FASHION_CLASSES, POSITIONS

KINDS = ("image", "two_images", "video", "spoken")
NUMBERS = {2: "two", 3: "three", 4: "four"}
ORDINALS = ("the first", "the second")

# question -> (phrasings for training and test, phrasings used only in the held-out set)
PHRASES = {
    "cell": (["what is at the {pos}?", "what do you see at the {pos}?", "what is in the {pos} corner?"],
             ["which item is at the {pos}?"]),
    "count": (["how many items are there?", "how many things are in the picture?"], ["how many items do you see?"]),
    "has": (["is there {a}?", "do you see {a}?"], ["is there {a} in the picture?"]),
    "where": (["where is the {item}?", "where do you see the {item}?"], ["in which corner is the {item}?"]),
    "followup": (["and at the {pos}?", "what about the {pos}?"], ["and what is at the {pos}?"]),
    "which": (["which picture has the {item}, the first or the second?",
               "is the {item} in the first or the second picture?"],
              ["in which picture is the {item}, the first or the second?"]),
    "more": (["which picture has more items?", "which picture shows more items?"],
             ["which of the two pictures has more items?"]),
    "direction": (["which way does it move?", "in which direction does it move?"], ["where does it go?"]),
    "mover": (["what moves?", "what is moving?"], ["which item moves?"]),
}  # fmt: skip
# the share of each question among the single-picture ones (text and spoken)
IMAGE_QUESTIONS = {"cell": 0.35, "count": 0.15, "has": 0.25, "where": 0.25}
FOLLOWUP_SHARE = 0.3  # of the training image conversations, those with a second turn
TEST_ONLY_SHARE = 0.3  # of the held-out text questions, those asked in a phrasing used only there


def words(text: str) -> list[str]:
    """An answer's words, lower-cased and without punctuation (how answers are compared)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def right(answer: str, reference: str) -> bool:
    return words(answer) == words(reference)


def _template_re(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("^" + "".join(".+?" if re.fullmatch(r"\{\w+\}", x) else re.escape(x) for x in parts) + "$")


_QUESTION_RES = [(key, _template_re(t)) for key, pools in PHRASES.items() for pool in pools for t in pool]


def question_key(question: str) -> str:
    """Which question a text asks (a PHRASES key: cell, count, has, where, which, more, direction, mover, ...)."""
    return next((key for key, rx in _QUESTION_RES if rx.match(question)), "other")


def item_phrase(label: int) -> str:
    name = FASHION_CLASSES[label]
    return ("an " if name[0] in "aeiou" else "a ") + name


class Asker:
    """Draws questions and their answers about composites ({cell: label}) and clips (label, direction)."""

    def __init__(self, rng: np.random.Generator, split: str):
        self.rng, self.split = rng, split
        self.spoken = False  # spoken questions keep to the training phrasings (held out: the voice and the picture)

    def phrase(self, key: str, **slots) -> str:
        train, test_only = PHRASES[key]
        held_out = self.split == "test" and not self.spoken and self.rng.random() < TEST_ONLY_SHARE
        pool = test_only if held_out else train
        return pool[int(self.rng.integers(len(pool)))].format(**slots)

    def about_image(self, layout: dict[int, int], question: str | None = None) -> tuple[str, str]:
        q = question or str(self.rng.choice(list(IMAGE_QUESTIONS), p=list(IMAGE_QUESTIONS.values())))
        if q == "cell":
            pos = int(self.rng.integers(4))
            return self.phrase("cell", pos=POSITIONS[pos]), self.cell_answer(layout, pos)
        if q == "count":
            return self.phrase("count"), NUMBERS[len(layout)]
        if q == "has":
            label = int(self.rng.integers(len(FASHION_CLASSES)))
            if self.rng.random() < 0.5 and layout:  # half the time an item that is there
                label = list(layout.values())[int(self.rng.integers(len(layout)))]
            return self.phrase("has", a=item_phrase(label)), "yes" if label in layout.values() else "no"
        once = [c for c, v in layout.items() if list(layout.values()).count(v) == 1]
        if not once:  # every item twice: ask for a count instead
            return self.about_image(layout, "count")
        cell = once[int(self.rng.integers(len(once)))]
        return self.phrase("where", item=FASHION_CLASSES[layout[cell]]), f"at the {POSITIONS[cell]}"

    @staticmethod
    def cell_answer(layout: dict[int, int], pos: int) -> str:
        """ "at the top left there is a sandal" / "... there is nothing": the place first, as the captions name it
        before the item they see there"""
        return f"at the {POSITIONS[pos]} there is " + (item_phrase(layout[pos]) if pos in layout else "nothing")

    def followup(self, layout: dict[int, int]) -> tuple[str, str]:
        pos = int(self.rng.integers(4))
        return self.phrase("followup", pos=POSITIONS[pos]), self.cell_answer(layout, pos)

    def about_two(self, first: dict[int, int], second: dict[int, int]) -> tuple[str, str] | None:
        """A question whose answer is "the first" or "the second"; None when these two pictures allow none."""
        only = [(k, lab) for k, lay in enumerate((first, second)) for lab in set(lay.values())
                if lab not in (second, first)[k].values()]  # fmt: skip
        if len(first) != len(second) and (not only or self.rng.random() < 0.35):
            return self.phrase("more"), ORDINALS[0 if len(first) > len(second) else 1]
        if not only:
            return None
        k, label = only[int(self.rng.integers(len(only)))]
        return self.phrase("which", item=FASHION_CLASSES[label]), ORDINALS[k]

    def about_clip(self, label: int, direction: str) -> tuple[str, str]:
        if self.rng.random() < 0.5:
            return self.phrase("direction"), f"it moves {direction}"  # "moves" then the way, as the captions
        return self.phrase("mover"), item_phrase(label)


def _turns(media: list[Part], qa: list[tuple[str, str]], spoken: Part | None = None) -> list[Message]:
    """The conversation: the media (+ the spoken question, or the first question's text), the answer, then any
    follow-up turns."""
    first = [*media, spoken] if spoken is not None else [*media, Part("text", qa[0][0])]
    out = [user_turn(first), Message("assistant", [Part("text", qa[0][1])])]
    for q, a in qa[1:]:
        out += [Message("user", [Part("text", q)]), Message("assistant", [Part("text", a)])]
    return out


class World:
    """Composites and clips from one Fashion-MNIST split, drawn as the caption corpora draw them."""

    def __init__(self, split: str, seed: int):
        self.images, self.labels = scenes.load_fashion_mnist(split)
        self.rng = np.random.default_rng(seed)
        self.ask = Asker(self.rng, split)

    def composite(self, name: str) -> tuple[Part, dict[int, int], bytes]:
        layout, png = scenes.draw_composite(self.rng, self.images, self.labels)
        return Part("image", ref=(name, png), name=name), layout, png

    def clip(self, name: str) -> tuple[Part, int, str, bytes]:
        label, d, mp4 = scenes.draw_clip(self.rng, self.images, self.labels)
        return Part("video", ref=(name, mp4), name=name), label, d, mp4


def plan(split: str, counts: dict[str, int], seed: int) -> list[dict]:
    """Conversations of each kind ({"kind", "messages", "question", "answer", "files": {name: bytes}}), spoken
    questions still as text (`voice` says who reads them); `counts`: kind -> number."""
    w = World(split, seed)
    voices = corpora.ESPEAK_TEST_VOICES if split == "test" else corpora.ESPEAK_TRAIN_VOICES
    out = []
    for kind in KINDS:
        for i in range(counts.get(kind, 0)):
            stem = f"{split}_{kind}_{i:05d}"
            rec: dict = {"kind": kind, "files": {}}
            if kind == "video":
                part, label, d, data = w.clip(f"{stem}.mp4")
                qa = [w.ask.about_clip(label, d)]
                media = [part]
                rec["files"][part.name] = data
            elif kind == "two_images":
                while True:
                    (p1, l1, d1), (p2, l2, d2) = w.composite(f"{stem}_a.png"), w.composite(f"{stem}_b.png")
                    if (one := w.ask.about_two(l1, l2)) is not None:
                        break
                qa, media = [one], [p1, p2]
                rec["files"].update({p1.name: d1, p2.name: d2})
            else:
                part, layout, data = w.composite(f"{stem}.png")
                w.ask.spoken = kind == "spoken"
                qa, media = [w.ask.about_image(layout)], [part]
                rec["files"][part.name] = data
                if kind == "image" and split == "train" and w.rng.random() < FOLLOWUP_SHARE:
                    qa.append(w.ask.followup(layout))
            if kind == "spoken":
                rec["voice"] = _voice(w.rng, voices, split)
                rec["audio_name"] = f"{stem}.wav"
            rec.update(media=media, qa=qa, question=qa[0][0], answer=qa[0][1])
            out.append(rec)
    return out


def _voice(rng: np.random.Generator, voices: list[str], split: str) -> tuple:
    """(engine, voice, speed, pitch) as the speech corpora draw them; a share of the training questions read by
    piper."""
    if split == "train" and rng.random() < 0.1:
        return ("piper", "joe", float(rng.choice([0.9, 1.0, 1.1])), 0)
    return ("espeak", voices[int(rng.integers(len(voices)))], int(rng.integers(140, 181)), int(rng.integers(35, 66)))


def speak(recs: list[dict]) -> None:
    """Synthesise every spoken question (in place: `files[audio_name]`), with the speech corpora's engines."""
    spoken = [r for r in recs if r["kind"] == "spoken"]
    plan_ = [(r["question"], *r["voice"]) for r in spoken]
    for r, wav in zip(spoken, corpora.speech_records(plan_, "q"), strict=True):
        r["files"][r["audio_name"]] = wav["audio"][1]


def training_records(recs: list[dict]) -> Iterator[dict]:
    """`write_shards` conversation records."""
    for r in recs:
        spoken = Part("audio", ref=(r["audio_name"], r["files"][r["audio_name"]])) if r["kind"] == "spoken" else None
        yield {"messages": _turns(r["media"], r["qa"], spoken), "json": {"kind": r["kind"], "answer": r["answer"]}}


def write_test_set(recs: list[dict], folder: Path) -> Path:
    """The held-out media as files in `folder` and `folder/dialogue_test.jsonl`, one line per question: {"kind",
    "media": [paths in order], "question", "answer"}; a spoken question's audio is its last medium and `question`
    holds the words spoken (not a prompt)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in recs:
        for name, data in r["files"].items():
            (folder / name).write_bytes(data)
        media = [p.name for p in r["media"]] + ([r["audio_name"]] if r["kind"] == "spoken" else [])
        line = {"kind": r["kind"], "media": [str(folder / m) for m in media], "question": r["question"]}
        lines.append({**line, "answer": r["answer"]})
    out = folder / "dialogue_test.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def read_test_set(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# of the training conversations, each kind's share
TRAIN_SHARES = {"image": 0.4, "two_images": 0.2, "video": 0.15, "spoken": 0.25}


def stage_dialogue_data(cfg, run: Path) -> dict:
    """Training conversations -> RUN/shards/dialogue_train; the held-out questions -> RUN/shards/dialogue_test (media
    files + dialogue_test.jsonl)."""
    train = plan("train", {k: round(cfg.dialogue_train * s) for k, s in TRAIN_SHARES.items()}, cfg.seed + 7)
    # kinds mixed through the shards: in plan order (kind after kind) each shard held one or two kinds, and the
    # stream (a shard per rank at a time, a 256-sample shuffle buffer) met them one after another; the run that met
    # the spoken shard last diverged there (loss 0.08 -> 1.5, gradient norm 0.8 -> 23 at step 155 of 200)
    train = [train[i] for i in np.random.default_rng(cfg.seed + 9).permutation(len(train))]
    test = plan("test", dict.fromkeys(KINDS, cfg.dialogue_test), cfg.seed + 8)
    speak(train)
    speak(test)
    rep = write_shards(training_records(train), run / "shards/dialogue_train", prefix="dialogue_train",
                       maxcount=1000, progress=False, replace=True)  # fmt: skip
    if rep.skipped:
        raise RuntimeError(f"dialogue_train: {rep.skipped} samples failed: {rep.first_errors[:3]}")
    path = write_test_set(test, run / "shards/dialogue_test")
    info = {
        "train": {k: sum(r["kind"] == k for r in train) for k in KINDS},
        "train_followups": sum(len(r["qa"]) > 1 for r in train),
        "test": {k: sum(r["kind"] == k for r in test) for k in KINDS},
        "test_only_phrasing": sum(r["question"] in _test_only() for r in test if r["kind"] != "spoken"),
        "seconds": round(rep.seconds, 1),
    }
    print(f"  dialogue: {rep.written} training conversations, {len(test)} held-out questions ({path})", flush=True)
    return info


def _test_only() -> set[str]:
    """Every held-out-only phrasing filled in every way (to count how often the test set used one)."""
    out = set()
    for _, only in PHRASES.values():
        for t in only:
            for pos in POSITIONS:
                for k, name in enumerate(FASHION_CLASSES):
                    out.add(t.format(pos=pos, item=name, a=item_phrase(k)))
    return out
