"""Demo corpora (recipes/demo/scenes.py, corpora.py): caption grammars invert exactly, clips need temporal order,
the speech corpus is open-vocabulary with disjoint train/test sentences and voices, and in-memory media go through
write_shards."""

import itertools
import json

import numpy as np
import pytest

from mm_llama.data.audio import decode_audio
from mm_llama.data.shards import iter_samples, open_url, read_index
from mm_llama.data.writer import write_shards
from mm_llama.text import normalize_text
from recipes.demo import corpora, scenes, voices


def test_every_layout_caption_parses_back():
    for k in (2, 3, 4):
        for cells in itertools.combinations(range(4), k):
            for labels in [(0, 1, 2, 3), (9, 9, 8, 1), (1, 4, 7, 9)]:
                layout = dict(zip(cells, labels))
                text = scenes.composite_caption(layout)
                assert scenes.parse_composite_caption(text) == layout, text
                assert scenes.parse_composite_caption(text + ".") == layout
    assert scenes.composite_caption({0: 7, 1: 8}) == "at the top, a sneaker to the left of a bag"
    assert scenes.composite_caption({1: 9, 3: 1}) == "at the top right an ankle boot and below it a pair of trousers"
    assert scenes.composite_caption({0: 0, 3: 5}) == "at the top left a T-shirt and at the bottom right a sandal"


def test_two_item_share_of_layouts():
    def counts(share):
        rng = np.random.default_rng(0)
        ks = [len(scenes.sample_layout(rng, 100, share)) for _ in range(3000)]
        return [ks.count(k) / len(ks) for k in (2, 3, 4)]

    assert counts(None) == pytest.approx([1 / 3] * 3, abs=0.03)  # even, as the held-out set
    assert counts(0.5) == pytest.approx([0.5, 0.25, 0.25], abs=0.03)
    assert counts(1.0) == [1.0, 0.0, 0.0]
    rng = np.random.default_rng(1)
    assert all(
        2 <= len(w) <= 4 and all(0 <= v < 7 for v in w.values())
        for w in (scenes.sample_layout(rng, 7, 0.5) for _ in range(50))
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a bag",
        "a bag at the top left",
        "at the top, a hat to the left of a bag",
        "at the top left a bag and at the top left a coat",
        "a bag to the left of a coat",
        "on the right, a bag above a coat",  # the earlier column template
        "at the bottom left a bag and below it a coat",
    ],
)
def test_malformed_captions_do_not_parse(text):
    assert scenes.parse_composite_caption(text) is None


def test_motion_needs_temporal_order():
    item = np.full((28, 28), 200, np.uint8)
    right = scenes.motion_frames(item, "to the right", 28)
    left = scenes.motion_frames(item, "to the left", 28)
    assert right.shape == (8, 56, 56)
    assert np.array_equal(right, left[::-1])  # same frames, opposite order
    assert right[0, 28:, :28].min() == 200 and right[-1, 28:, 28:].min() == 200 and right[-1, :, :28].max() == 0
    down = scenes.motion_frames(item, "down", 0)
    assert down[3, :28, :28].min() == 200 and down[4, 28:, :28].min() == 200 and down[4, :28].max() == 0
    for d in scenes.DIRECTIONS:
        assert scenes.parse_motion_caption(scenes.motion_caption(3, d)) == (3, d)
    assert scenes.parse_motion_caption("a dress moves sideways") is None


def test_fashion_mnist_and_clip_shards(tmp_path):
    images, labels = scenes.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and set(labels.tolist()) == set(range(10))
    rep = write_shards(scenes.motion_records("test", 4, 0), tmp_path / "v", progress=False)
    rep2 = write_shards(scenes.composite_records("test", 5, 0), tmp_path / "i", progress=False)
    assert (rep.written, rep.skipped, rep2.written) == (4, 0, 5)
    urls, _ = read_index(tmp_path / "i/index.json")
    s = next(iter_samples(open_url(urls[0]), urls[0]))
    layout = {int(c): v for c, v in json.loads(s["json"])["layout"].items()}
    assert scenes.parse_composite_caption(s["txt"].decode()) == layout and s["png"][:4] == b"\x89PNG"


def test_speech_corpus_is_open_vocabulary_with_disjoint_splits():
    sents = corpora.fortune_sentences()
    words = {w.strip(".,!?;:").lower() for s in sents for w in s.split()}
    assert len(sents) > 5000 and len(words) > 3000
    assert all(not any(ch.isdigit() for ch in s) for s in sents)
    train, test = corpora.speech_plan(sents, 300, 50, 0, piper_train=5)
    assert not {p[0] for p in train} & {p[0] for p in test}
    assert not {p[2] for p in train if p[1] == "espeak"} & {p[2] for p in test}
    assert sum(p[1] == "piper" for p in train) == 5 and all(p[1] == "espeak" for p in test)
    with pytest.raises(scenes.CorpusError, match="fortunes give"):
        corpora.speech_plan(sents, len(sents), 1, 0)


def test_tts_engines_give_decodable_speech():
    for rec in corpora.speech_records(
        [
            ("A man paints with his brains.", "espeak", "en-us+m3", 160, 50),
            ("A man paints with his brains.", "piper", "joe", 1.0, 0),
        ],
        "t",
    ):
        wave = decode_audio(rec["audio"][1], rec["audio"][0], "wav")
        assert wave.ndim == 1 and 0.8 * 16000 < wave.shape[0] < 6 * 16000 and float(wave.abs().max()) > 0.05
    with pytest.raises(scenes.CorpusError, match="espeak-ng -v no-such-voice"):
        voices.espeak_wav("hello there", "no-such-voice")


def test_flite_reads_the_unseen_engine_set_and_real_speech_ships():
    """flite (used in no training set) reads the domain's test sentences; the real-speech set is the ten
    pocketsphinx test utterances with their transcripts."""
    plan = corpora.flite_plan([("The blue bag moves up.", "espeak", "en-us+m2", 160, 50)] * 2, seed=0)
    assert all(p[1] == "flite" and p[2] in voices.FLITE_VOICES for p in plan)
    for rec in corpora.speech_records(plan, "u"):
        wave = decode_audio(rec["audio"][1], rec["audio"][0], "wav")
        assert 0.5 * 16000 < wave.shape[0] < 6 * 16000 and float(wave.abs().max()) > 0.05
    with pytest.raises(scenes.CorpusError, match="flite -voice nobody"):
        voices.flite_wav("hello there", "nobody")
    real = list(voices.real_speech_records())
    assert len(real) == 10 and {r["json"]["voice"] for r in real} == {"librivox", "cards"}
    assert real[1]["text"] == "He was not an ill disposed young man."
    assert all(decode_audio(r["audio"][1], r["audio"][0], "wav").shape[0] > 16000 for r in real)


def test_augmented_training_clips_are_recorded_and_reproducible():
    plan = [("A man paints with his brains.", "espeak", "en-us+m3", 160, 50)] * 2
    a = list(corpora.speech_records(plan, "t", augment={1: 7}))
    b = list(corpora.speech_records(plan, "t", augment={1: 7}))
    assert "augment" not in a[0]["json"] and a[1]["json"]["augment"]["peak"] > 0
    assert a[1]["audio"][1] == b[1]["audio"][1] != a[0]["audio"][1]  # the same seed, the same clip


def test_spoken_domain_splits_vocabulary_and_determinism():
    """The spoken-language domain: test sentences never appear in any training draw (the split is a property of
    the sentence), at least 150 distinct words, everything spelled out, the same draw for the same seed."""

    tests = set(corpora.spoken_sentences("test", 300, seed=0)) | set(corpora.spoken_sentences("test", 300, seed=7))
    for seed in (0, 1, 7):
        train = corpora.spoken_sentences("train", 2000, seed)
        assert len(set(train)) == 2000 and not tests & set(train)
    assert corpora.spoken_sentences("train", 50, 3) == corpora.spoken_sentences("train", 50, 3)
    assert all(corpora.spoken_split(s) == "test" for s in tests)
    words = corpora.spoken_vocabulary()
    assert len(words) >= 150
    heard = {w for s in corpora.spoken_sentences("train", 3000, 0) for w in normalize_text(s).split()}
    assert heard <= words and len(heard) >= 150
    assert not any(ch.isdigit() for s in tests for ch in s)
    for name in scenes.FASHION_CLASSES:  # the demo's own world: every item name is spoken
        assert any(name in s for s in corpora.spoken_sentences("train", 500, 0))
    with pytest.raises(ValueError, match="split"):
        corpora.spoken_sentences("dev", 3, 0)


def test_spoken_plan_voices_disjoint():
    train, test = corpora.spoken_plan(60, 20, seed=0, piper_train=5)
    assert {v for _, e, v, *_ in test} <= set(corpora.ESPEAK_TEST_VOICES)
    assert {v for _, e, v, *_ in train if e == "espeak"} <= set(corpora.ESPEAK_TRAIN_VOICES)
    assert sum(e == "piper" for _, e, *_ in train) == 5 and not {p[0] for p in train} & {p[0] for p in test}


def test_two_sentences_in_one_clip():
    """A joined clip is both sentences in one voice with a pause between them, its transcript both; joining keeps
    every sentence once, only pairs within the word budget, and the held-out joined set uses held-out sentences."""
    train, _ = corpora.spoken_plan(400, 0, seed=0)
    joined = corpora.join_sentences(train, 0.5, np.random.default_rng(0))
    assert sorted(corpora.sentences_of(joined)) == sorted(p[0] for p in train)
    pairs = [p for p in joined if "\n" in p[0]]
    assert 0.1 * len(joined) < len(pairs) and all(len(p[0].split()) <= corpora.JOIN_WORDS for p in pairs)
    assert corpora.join_sentences(train, 0.0, np.random.default_rng(0)) == train
    test = corpora.joined_test_plan(5, seed=0)
    assert len(test) == 5 and all(corpora.spoken_split(s) == "test" for s in corpora.sentences_of(test))
    one, two = (
        ("Fold two red bags.", "espeak", "en-us+m3", 160, 50),
        ("The coat walks up.", "espeak", "en-us+m3", 160, 50),
    )
    a, b, both = corpora.speech_records([one, two, ("Fold two red bags.\nThe coat walks up.", *one[1:])], "j")
    assert both["text"] == "Fold two red bags. The coat walks up." and both["json"]["sentences"] == 2
    n = [decode_audio(r["audio"][1], r["audio"][0], "wav").shape[0] for r in (a, b, both)]
    assert n[0] + n[1] + 0.3 * 16000 <= n[2] <= n[0] + n[1] + 0.8 * 16000 + 1
