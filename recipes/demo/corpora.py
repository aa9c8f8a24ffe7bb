"""The demo's speech corpora: sentences of a spoken-language grammar over the demo's world (`spoken_sentences`) and
open-vocabulary sentences from Debian's fortune collections, read by espeak-ng voices and a piper voice (held-out
sentences AND held-out voices for testing). Builders yield `write_shards` records (audio as `(name, bytes)`, the
exact transcript as `text`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mm_llama.data.audio import SAMPLE_RATE, augment_speech, decode_audio, wav_bytes
from mm_llama.text import normalize_text, number_words

from .scenes import DIRECTIONS, CorpusError, need
from .voices import FLITE_VOICES, PiperTTS, espeak_wav, flite_wav

FORTUNE_DIR = Path("/usr/share/games/fortunes")  # Debian fortunes / fortunes-min


# ----------------------------------------------------------------------------------------------
# speech: fortune sentences read by several TTS engines / voices

_SENT_OK = re.compile(r"^[A-Z][A-Za-z' ,;-]*[a-z][.!?]$")


def fortune_sentences(root: Path = FORTUNE_DIR, min_words: int = 4, max_words: int = 12) -> list[str]:
    """Distinct plain-English sentences from the fortune files (no digits, quotes or symbols, so the transcript is
    exactly what the TTS reads), in a fixed order."""
    need(root, "fortunes")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and (root / f"{p.name}.dat").exists())
    seen, out = set(), []
    for path in files:
        text = path.read_text("utf-8", errors="replace")
        for fortune in text.split("\n%\n"):
            body = " ".join(ln.strip() for ln in fortune.splitlines() if not ln.strip().startswith("--"))
            for s in re.split(r"(?<=[.!?])\s+", " ".join(body.split())):
                s = s.strip()
                if not _SENT_OK.match(s) or "  " in s or "--" in s or " -" in s or "- " in s:
                    continue
                n = len(s.split())
                key = s.lower()
                if min_words <= n <= max_words and key not in seen:
                    seen.add(key)
                    out.append(s)
    return out


# the spoken-language domain: sentences from a grammar over the demo's world (its ten items, the four grid cells,
# the four directions), with colours, sizes, numbers one to ninety-nine, counts and verbs; everything spelled out, so
# the transcript is exactly what the voice reads

_ITEMS = [
    ("T-shirt", "T-shirts"),
    ("pair of trousers", "pairs of trousers"),
    ("pullover", "pullovers"),
    ("dress", "dresses"),
    ("coat", "coats"),
    ("sandal", "sandals"),
    ("shirt", "shirts"),
    ("sneaker", "sneakers"),
    ("bag", "bags"),
    ("ankle boot", "ankle boots"),
]
_COLOURS = "red blue green yellow black white orange purple pink brown grey golden silver dark beige navy".split()
_SIZES = "small large tiny big long short old new soft warm clean heavy light striped spotted".split()
_MOVES = [
    ("moves", "move"),
    ("slides", "slide"),
    ("rolls", "roll"),
    ("drifts", "drift"),
    ("jumps", "jump"),
    ("walks", "walk"),
    ("runs", "run"),
    ("floats", "float"),
    ("falls", "fall"),
    ("climbs", "climb"),
    ("turns", "turn"),
    ("glides", "glide"),
]
_ADVERBS = "slowly quickly quietly gently twice again suddenly carefully".split()
_PLACE_VERBS = "put place move bring leave hang".split()
_LIST_VERBS = "count find show take fold wash pack hide".split()
_RELATIONS = ["above", "below", "beside", "next to", "to the left of", "to the right of", "under", "near"]
_WHERE = [
    "in the top left corner",
    "in the top right corner",
    "in the bottom left corner",
    "in the bottom right corner",
    "at the top",
    "at the bottom",
    "on the left",
    "on the right",
    "in the middle",
]
SPOKEN_TEST_EVERY = 8  # a sentence is a test sentence when its checksum says so: 1 in 8


def _spoken_sentence(rng: np.random.Generator) -> str:
    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    def item(plural=False, article=True):
        one, many = pick(_ITEMS)
        if plural:
            return many
        words = [w for w in (pick(_SIZES) if rng.random() < 0.4 else None, pick(_COLOURS)) if w] + [one]
        return ("the " if article else "") + " ".join(words)

    def n():
        return int(rng.integers(2, 100))

    form = int(rng.integers(9))
    if form == 0:
        s = f"{item()} {pick(_MOVES)[0]} {pick(list(DIRECTIONS))}"
        s += f" {pick(_ADVERBS)}" if rng.random() < 0.5 else ""
    elif form == 1:
        s = f"there are {number_words(n())} {pick(_COLOURS)} {item(plural=True)} {pick(_WHERE)}"
    elif form == 2:
        s = f"{pick(_PLACE_VERBS)} {item()} {pick(_WHERE)}"
    elif form == 3:
        s = f"{item()} is {pick(_RELATIONS)} {item()}"
    elif form == 4:
        s = f"{number_words(n())} {item(plural=True)} {pick(_MOVES)[1]} {pick(list(DIRECTIONS))}"
        s += f" {pick(_ADVERBS)}" if rng.random() < 0.5 else ""
    elif form == 5:
        s = (
            f"{pick(_LIST_VERBS)} {number_words(n())} {pick(_COLOURS)} {item(plural=True)} and "
            f"{number_words(n())} {pick(_COLOURS)} {item(plural=True)}"
        )
    elif form == 6:
        s = f"{item()} {pick(_WHERE)} {pick(_MOVES)[0]} {pick(list(DIRECTIONS))} {number_words(n())} steps"
    elif form == 7:
        s = f"there is one {item(article=False)} {pick(_WHERE)}"
    else:
        s = f"{item()} {pick(_MOVES)[0]} {pick(list(DIRECTIONS))} and then {pick(list(DIRECTIONS))}"
    return s[0].upper() + s[1:] + "."


def spoken_split(sentence: str) -> str:
    """ "test" or "train", fixed per sentence (a checksum of its text), so no draw of one split holds a sentence
    of the other."""

    return "test" if zlib.crc32(sentence.lower().encode()) % SPOKEN_TEST_EVERY == 0 else "train"


def spoken_sentences(split: str, n: int, seed: int) -> list[str]:
    """`n` distinct sentences of the spoken-language domain from `split` ("train" or "test"). Test sentences
    never appear in any training draw (whatever the seeds): the split is a property of the sentence."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out: dict[str, None] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise CorpusError(f"could not draw {n} distinct {split} sentences")
        s = _spoken_sentence(rng)
        if spoken_split(s) == split:
            out.setdefault(s)
    return list(out)


def spoken_vocabulary() -> set[str]:
    """Every word the grammar can say (normalised as WER scoring does)."""
    words = set()
    for group in (
        _COLOURS,
        _SIZES,
        _ADVERBS,
        _PLACE_VERBS,
        _LIST_VERBS,
        _RELATIONS,
        _WHERE,
        list(DIRECTIONS),
        [w for pair in _ITEMS + _MOVES for w in pair],
        [number_words(i) for i in range(2, 100)],
        ["the there are is and then one steps"],
    ):
        for phrase in group:
            words.update(normalize_text(phrase).split())
    return words


# espeak-ng voices: accent + variant; mild variants only (wild ones are hard to understand even for people)
ESPEAK_TRAIN_VOICES = [
    "en-us+m1",
    "en-us+m3",
    "en-us+f1",
    "en-us+f3",
    "en-gb+m2",
    "en-gb+m4",
    "en-gb+f2",
    "en-gb+f4",
    "en-gb-x-rp+m1",
    "en-gb-x-rp+f2",
    "en-gb-scotland+m3",
    "en-gb-x-gbcwmd+m2",
    "en-029+m1",
    "en-us+Andy",
    "en-us+klatt",
    "en-gb+paul",
    # more speakers, so that the adapter hears voices rather than a voice (none of the test voices' variants)
    "en-us+Annie",
    "en-us+david",
    "en-us+linda",
    "en-us+robert",
    "en-gb+steph",
    "en-gb+edward",
    "en-gb-x-rp+m5",
    "en-us+f5",
    "en-gb-scotland+f1",
    "en-029+f4",
    "en-us+m6",
    "en-gb+john",
]
ESPEAK_TEST_VOICES = ["en-us+m2", "en-us+f2", "en-gb+m3", "en-gb-x-rp+m4", "en-gb+f3", "en-us+michel"]


def flite_plan(plan: list[tuple], seed: int) -> list[tuple]:
    """The same sentences read by flite voices (drawn at random): (sentence, "flite", voice, 0, 0)."""
    rng = np.random.default_rng(seed)
    return [(p[0], "flite", FLITE_VOICES[int(rng.integers(len(FLITE_VOICES)))], 0, 0) for p in plan]


def speech_plan(sentences: list[str], n_train: int, n_test: int, seed: int, piper_train: int = 0):
    """Disjoint sentence sets; train on ESPEAK_TRAIN_VOICES (+ piper), test on ESPEAK_TEST_VOICES only.
    -> (train, test) lists of (sentence, engine, voice, speed, pitch)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    if n_train + n_test > len(sentences):
        raise CorpusError(f"asked for {n_train} + {n_test} sentences, the fortunes give {len(sentences)}")
    test_s = [sentences[i] for i in order[:n_test]]
    train_s = [sentences[i] for i in order[n_test : n_test + n_train]]

    return _assign_voices(train_s, ESPEAK_TRAIN_VOICES, piper_train, rng), _assign_voices(
        test_s, ESPEAK_TEST_VOICES, 0, rng
    )


def _assign_voices(texts: list[str], voices: list[str], piper_n: int, rng: np.random.Generator) -> list[tuple]:
    """(sentence, engine, voice, speed, pitch) per text: the first `piper_n` read by piper, the rest by espeak-ng
    voices drawn from `voices` at random speed and pitch."""
    out = []
    for k, s in enumerate(texts):
        if k < piper_n:
            out.append((s, "piper", "joe", float(rng.choice([0.9, 1.0, 1.1])), 0))
        else:
            v = voices[int(rng.integers(len(voices)))]
            out.append((s, "espeak", v, int(rng.integers(140, 181)), int(rng.integers(35, 66))))
    return out


def spoken_plan(n_train: int, n_test: int, seed: int, piper_train: int = 0):
    """The spoken-language domain's (train, test) plans as `speech_plan` gives them: test sentences and espeak
    voices never seen in training."""
    rng = np.random.default_rng([seed, 2])
    train_s, test_s = spoken_sentences("train", n_train, seed), spoken_sentences("test", n_test, seed)
    return _assign_voices(train_s, ESPEAK_TRAIN_VOICES, piper_train, rng), _assign_voices(
        test_s, ESPEAK_TEST_VOICES, 0, rng
    )


# two sentences are read into one clip (`join_sentences`) when they have at most this many words together: about
# 4-7 s of speech read at 140-180 words a minute, within the demo's 8 s pieces (the speech configs' piece_seconds)
JOIN_WORDS = 16
PAUSE_SECONDS = (0.3, 0.8)  # the silence between two sentences of one clip, drawn per clip


def join_sentences(plan: list[tuple], share: float, rng: np.random.Generator, max_words: int = JOIN_WORDS):
    """Some clips of `plan` hold two sentences: with probability `share` an entry is joined with the first of the
    next 8 entries not yet used whose sentence fits with it in `max_words` words, read by the first one's voice. A
    joined entry's text is the sentences with a newline between them (`speech_records` reads each and puts a pause
    between them); every sentence of `plan` stays in it once."""
    out, used = [], set()
    for i, a in enumerate(plan):
        if i in used:
            continue
        n = len(a[0].split())
        fits = (
            j for j in range(i + 1, min(i + 9, len(plan))) if j not in used and n + len(plan[j][0].split()) <= max_words
        )
        j = next(fits, None) if rng.random() < share else None
        if j is None:
            out.append(a)
            continue
        used.add(j)
        out.append((a[0] + "\n" + plan[j][0], *a[1:]))
    return out


def sentences_of(plan: list[tuple]) -> list[str]:
    """Every sentence of a plan (a joined entry holds two)."""
    return [s for p in plan for s in p[0].split("\n")]


def joined_test_plan(n: int, seed: int) -> list[tuple]:
    """`n` held-out clips of two held-out sentences each (as `join_sentences` pairs them), read by held-out voices:
    the sentences are drawn from the test split as the domain's test set draws them, more of them, since only
    short pairs fit."""
    rng = np.random.default_rng([seed, 3])
    plan = _assign_voices(spoken_sentences("test", 8 * n, seed), ESPEAK_TEST_VOICES, 0, rng)
    return [p for p in join_sentences(plan, 1.0, rng) if "\n" in p[0]][:n]


def speech_records(
    plan: list[tuple], prefix: str, threads: int = 2, augment: dict[int, int] | None = None
) -> Iterator[dict]:
    """Synthesise `plan` (from speech_plan) in order; espeak-ng runs as `threads` parallel processes. `augment`
    {plan index: seed}: those clips as another recording might sound (data.audio.augment_speech; written as 16 kHz
    WAV, what was done in the sample's json under "augment"). An entry of two sentences (`join_sentences`) is read
    one sentence at a time, the two joined with a pause (PAUSE_SECONDS); its transcript is both, with a space."""
    augment = augment or {}

    piper = PiperTTS() if any(p[1] == "piper" for p in plan) else None

    def synth_one(text, engine, voice, speed, pitch):
        if engine == "flite":
            return flite_wav(text, voice)
        return piper.wav(text, length_scale=speed) if engine == "piper" else espeak_wav(text, voice, speed, pitch)

    def synth(i, p):
        sentences = p[0].split("\n")
        if len(sentences) == 1:
            return synth_one(*p)
        g, parts = np.random.default_rng([i, 7]), []
        for s in sentences:
            if parts:
                parts.append(torch.zeros(int(g.uniform(*PAUSE_SECONDS) * SAMPLE_RATE)))
            parts.append(decode_audio(synth_one(s, *p[1:]), f"{prefix}{i:06d}.wav", "wav"))
        return wav_bytes(torch.cat(parts))

    def make(i, p):
        data, info = synth(i, p), {}
        if "\n" in p[0]:
            info["sentences"] = p[0].count("\n") + 1
        if i in augment:
            wave, done = augment_speech(
                decode_audio(data, f"{prefix}{i:06d}.wav", "wav"), np.random.default_rng(augment[i])
            )
            data, info = wav_bytes(wave), {**info, "augment": done}
        return data, info

    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(plan), 64):  # a bounded window of clips in memory
            chunk = plan[start : start + 64]
            for i, (p, (data, info)) in enumerate(
                zip(chunk, pool.map(make, range(start, start + len(chunk)), chunk)), start
            ):
                text, engine, voice, speed, pitch = p
                yield {
                    "audio": (f"{prefix}{i:06d}.wav", data),
                    "text": text.replace("\n", " "),
                    "json": {"engine": engine, "voice": voice, "speed": speed, "pitch": pitch, **info},
                }
