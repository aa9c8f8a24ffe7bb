"""The data stages: real corpora -> shards, and the demo image encoder pretrained as a plain classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mm_llama.adapters.modalities.speech import cache_encoder_outputs, load_encoder
from mm_llama.data.audio import SAMPLE_RATE, decode_audio
from mm_llama.data.writer import write_shards

from ..train import load_train_config
from . import corpora, scenes, voices
from .classifier import classifier_accuracy, save_classifier, train_classifier
from .config import DemoConfig, device_ok_dtype, shard_samples, stage_config

# the corpora a DemoConfig size of 0 leaves out (make demo-speech-open writes no image or video sets)
SIZED = ("image_train", "image_test", "video_train", "video_test", "speech_open_test", "speech_unseen_test",
         "speech_joined_test")  # fmt: skip


def speech_plans(cfg: DemoConfig) -> dict:
    """The speech sets' plans (corpora.speech_records entries) and which training clips are augmented: the
    spoken-language domain (+ optionally open-vocabulary fortune sentences, mixed in; some clips two sentences
    long), its held-out sentences read by unseen espeak-ng voices, by flite, and two to a clip, and a second held-out
    set of fortune sentences for the open-vocabulary row."""
    train_plan, test_plan = corpora.spoken_plan(
        cfg.speech_train, cfg.speech_test, cfg.seed + 4, piper_train=cfg.piper_train
    )
    open_train, open_test = corpora.speech_plan(
        corpora.fortune_sentences(), cfg.speech_open_train, cfg.speech_open_test, cfg.seed + 5
    )
    mixed = train_plan + open_train
    mixed = [mixed[i] for i in np.random.default_rng(cfg.seed + 6).permutation(len(mixed))]
    mixed = corpora.join_sentences(mixed, cfg.speech_joined, np.random.default_rng(cfg.seed + 14))
    rng = np.random.default_rng(cfg.seed + 12)
    picked = rng.permutation(len(mixed))[: round(cfg.speech_augment * len(mixed))]
    augment = {int(i): int(s) for i, s in zip(picked, rng.integers(2**31, size=len(picked)), strict=True)}
    return {
        "train": mixed,
        "augment": augment,
        "test": test_plan,
        "open_test": open_test,
        "unseen": corpora.flite_plan(test_plan[: cfg.speech_unseen_test], cfg.seed + 13),
        "joined": corpora.joined_test_plan(cfg.speech_joined_test, cfg.seed + 15),
    }


def within_seconds(records, seconds: float):
    """The speech records whose clip lasts at most `seconds` (a held-out clip of two sentences is one piece)."""
    for r in records:
        if len(decode_audio(r["audio"][1], r["audio"][0], "wav")) <= seconds * SAMPLE_RATE:
            yield r


def stage_corpora(cfg: DemoConfig, run: Path) -> dict:
    out, info = run / "shards", {}
    jobs = {
        "image_train": lambda: scenes.composite_records("train", cfg.image_train, cfg.seed, cfg.image_two_item_share),
        "image_test": lambda: scenes.composite_records("test", cfg.image_test, cfg.seed + 1),
        "video_train": lambda: scenes.motion_records("train", cfg.video_train, cfg.seed + 2),
        "video_test": lambda: scenes.motion_records("test", cfg.video_test, cfg.seed + 3),
    }
    sp = speech_plans(cfg)
    piece = speech_settings(cfg).piece_seconds
    jobs["speech_train"] = lambda: corpora.speech_records(sp["train"], "tr", augment=sp["augment"])
    jobs["speech_test"] = lambda: corpora.speech_records(sp["test"], "te")
    jobs["speech_open_test"] = lambda: corpora.speech_records(sp["open_test"], "to")
    jobs["speech_unseen_test"] = lambda: corpora.speech_records(sp["unseen"], "tu")
    jobs["speech_joined_test"] = lambda: within_seconds(corpora.speech_records(sp["joined"], "tj"), piece)
    jobs["speech_real_test"] = voices.real_speech_records
    for name, make in jobs.items():
        if name in SIZED and getattr(cfg, name) == 0:  # a set asked for with 0 samples is not written
            continue
        rep = write_shards(make(), out / name, prefix=name, maxcount=1000, progress=False, replace=True)
        if rep.skipped:
            raise RuntimeError(f"corpus {name}: {rep.skipped} samples failed to decode: {rep.first_errors[:3]}")
        info[name] = {"samples": rep.written, "shards": len(rep.shards), "seconds": round(rep.seconds, 1)}
        print(f"  {name}: {rep.written} samples in {len(rep.shards)} shards ({rep.seconds:.1f} s)", flush=True)

    def words(plan):
        return {w.strip(".,!?;:").lower() for s, *_ in plan for w in s.split()}

    mixed, test_plan = sp["train"], sp["test"]
    tr_w, te_w = words(mixed), words(test_plan)
    info["speech_words"] = {
        "train": len(tr_w),
        "test": len(te_w),
        "corpus": len(tr_w | te_w),
        "test_words_unseen_in_train": len(te_w - tr_w),
    }
    info["speech_grammar_words"] = len(corpora.spoken_vocabulary())
    info["speech_voices"] = {
        "train": sorted({f"{e}:{v}" for _, e, v, *_ in mixed}),
        "test": sorted({f"{e}:{v}" for _, e, v, *_ in test_plan}),
        "unseen_engine_test": sorted({f"{e}:{v}" for _, e, v, *_ in sp["unseen"]}),
    }
    info["speech_augmented"] = len(sp["augment"])
    info["speech_joined_clips"] = sum("\n" in p[0] for p in mixed)
    held_out = corpora.sentences_of(test_plan + sp["open_test"] + sp["joined"])
    info["speech_sentence_overlap"] = len(set(corpora.sentences_of(mixed)) & set(held_out))
    (out / "corpora.json").write_text(json.dumps(info, indent=1))
    return info


def speech_settings(cfg: DemoConfig):
    """The speech stage's model.speech settings (its config with the user's overrides): the frozen encoder whose
    outputs the speech_cache stage stores, the piece length its answers are cut to."""
    return load_train_config(stage_config("speech"), cfg.stages.get("speech", [])).model.speech


def stage_speech_cache(cfg: DemoConfig, run: Path) -> dict:
    """The frozen speech encoder's outputs, computed once per training clip and stored with the shards
    (shards/speech_train_enc, as `mm-llama shards encode` does): the Whisper stages train on them."""
    enc = speech_settings(cfg).encoder
    src, dst = run / "shards/speech_train/index.json", run / "shards/speech_train_enc"
    rep = cache_encoder_outputs(load_encoder(enc), enc, src, dst, replace=True)
    print(f"  speech_train_enc: {rep.written} clips encoded in {rep.seconds:.1f} s", flush=True)
    return {"clips": rep.written, "seconds": round(rep.seconds, 1)}


def stage_encoder(cfg: DemoConfig, run: Path) -> dict:
    bf16 = device_ok_dtype(cfg, run) == "bfloat16"
    model, losses = train_classifier(
        "demo", cfg.encoder_steps, cfg.encoder_batch, cfg.seed, bf16, label_smoothing=cfg.encoder_smoothing
    )
    out = run / "encoder"
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out)
    # baseline: the same classifier on the held-out composites (test-split items only)
    acc, total = classifier_accuracy(model, shard_samples(run / "shards/image_test/index.json", cfg.eval_limit))
    res = {
        "item_accuracy": acc,
        "items": total,
        "steps": cfg.encoder_steps,
        "batch": cfg.encoder_batch,
        "label_smoothing": cfg.encoder_smoothing,
        "losses": losses,
    }
    (out / "classifier.json").write_text(json.dumps(res))
    print(f"  plain classifier: {acc:.1%} of {total} held-out items", flush=True)
    return {k: v for k, v in res.items() if k != "losses"}
