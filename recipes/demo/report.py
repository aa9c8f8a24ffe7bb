"""The report stage: runs/demo/report.md with times, corpus facts, results against targets, loss curves, a caption
grid, examples and the commands to try the trained adapters."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.data.image import decode_image
from mm_llama.text import normalize_text

from .config import BF16_MIN_SPEEDUP, cpu_kernel_path, dialogue_files, eval_dtype, shard_samples
from .dialogue import KINDS
from .figures import FIGURES


def results_table(summ: dict, timings: dict, sections: dict) -> list[str]:
    """The figures of the figure table this run produced, with their targets; the set sizes and training steps."""
    lines = ["## Results on held-out data", "", "| figure | what | target | result |", "|---|---|---|---:|"]
    lines += [
        f"| `{f.key}` | {f.what} | {f.target_text()} | {_pct(v)} |" for f in FIGURES if (v := f.value(summ)) is not None
    ]
    sizes = ", ".join(f"{k} {s['n']}" for k, s in sections.items() if s.get("n"))
    steps = ", ".join(f"{k} {v['result']['steps']}" for k, v in timings.items() if "steps" in (v.get("result") or {}))
    lines += ["", f"Held-out samples: {sizes}. Training steps: {steps}.", ""]
    return lines


def _pyplot():
    """matplotlib's pyplot on the file-only backend (the demo extra; only the report draws)."""
    import matplotlib  # noqa: PLC0415 - the demo extra, heavy; only the report stage draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the backend is chosen

    return plt


LOSS_PANELS = ("encoder", "image", "video", "speech_ctc", "speech", "dialogue", "conformer_ctc", "conformer")


def _stage_losses(run: Path) -> dict[str, list[float]]:
    """Each trained stage's loss per optimizer step (the encoder's from its classifier record)."""
    out = {}
    for name in LOSS_PANELS:
        f = run / name / ("classifier.json" if name == "encoder" else "losses.json")
        if f.exists():
            rec = json.loads(f.read_text())
            out[name] = rec["losses"] if name == "encoder" else rec
    return out


def _plot_losses(run: Path, path: Path) -> None:
    """One panel per stage, each on its own step axis (the encoder's 6,000 steps would squeeze the others)."""
    plt = _pyplot()
    losses = _stage_losses(run)
    if not losses:
        return
    cols = min(4, len(losses))
    rows = (len(losses) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(losses) :]:
        ax.axis("off")
    for ax, (name, ys) in zip(axes.flat, losses.items()):
        ax.plot(range(1, len(ys) + 1), ys, lw=1)
        what = "CTC phase (CTC loss)" if name.endswith("_ctc") else "token loss"
        what = {"encoder": "classifier pretraining", "dialogue": "questions + captions"}.get(name, what)
        ax.set_title(f"{name}: {what}", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("training loss per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _media_picture(paths: list[str]):
    """What a held-out question was about, as one picture: the composites side by side; a clip's first and last
    frames side by side; audio files left out."""
    import numpy as np  # noqa: PLC0415 - only the report draws

    from mm_llama.data.video import decode_video  # noqa: PLC0415 - only the report draws

    panels = []
    for m in paths:
        data = Path(m).read_bytes()
        if m.endswith(".png"):
            panels.append(np.asarray(decode_image(data).convert("L"), dtype=np.float64))
        elif m.endswith(".mp4"):
            frames = decode_video(data, m, num_frames=8).float()
            panels += [frames[0].mean(0).numpy(), frames[-1].mean(0).numpy()]
    gap = np.full((panels[0].shape[0], 4), 128.0)
    return np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)


def _exchange_grid(rows: list[dict], path: Path, per_kind: int = 3) -> list[dict]:
    """A few held-out exchanges of each kind (the first of the file): the picture, the question, the answer. ->
    the exchanges shown."""
    shown = [r for k in KINDS for r in [r for r in rows if r["kind"] == k][:per_kind]]
    if not shown:
        return []
    plt = _pyplot()
    cols = per_kind
    rows_ = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.3 * rows_), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        ax.imshow(_media_picture(r["media"]), cmap="gray", vmin=0, vmax=255)
        q = ("(spoken) " if r["kind"] == "spoken" else "") + r["question"]
        ax.set_title(_wrap(f"Q: {q}\nA: {r['hyp']}", 44), fontsize=8, color="green" if r["right"] else "red")
    fig.suptitle("held-out dialogue: question and answer (green = right)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return shown


def _dialogue_section(run: Path, rows: list[dict], by_question: dict) -> list[str]:
    shown = _exchange_grid(rows, run / "dialogue_grid.png")
    L = [
        "## Dialogue: held-out exchanges",
        "",
        "Each question is answered as `mm-llama ask` answers it (the files, then the question; a spoken question is "
        "its audio alone), from `eval/dialogue_test.jsonl`.",
        "",
        "![held-out exchanges](dialogue_grid.png)",
        "",
        "| kind | question | reference | answer |",
        "|---|---|---|---|",
    ]
    L += [_exchange_row(r) for r in shown]
    L += ["", "Right answers by question:", "", "| kind | question | right | asked |", "|---|---|---:|---:|"]
    L += [f"| {k} | {q} | {_pct(a / n)} | {n} |" for k, qs in by_question.items() for q, (a, n) in qs.items()]
    wrong = [r for r in rows if not r["right"]][:8]
    if wrong:
        L += ["", "Some wrong answers:", "", "| kind | question | reference | answer |", "|---|---|---|---|"]
        L += [_exchange_row(r) for r in wrong]
    return [*L, ""]


def _exchange_row(r: dict) -> str:
    return f"| {r['kind']} | {r['question']} | {r['answer']} | {r['hyp']} |"


def _distinct(rows: list[dict]) -> str:
    return f"{len({normalize_text(r['hyp']) for r in rows})} of {len(rows)}"


def _caption_grid(run: Path, rows: list[dict], path: Path, n: int = 12) -> None:
    plt = _pyplot()
    rows = rows[:n]  # the first rows are the shard's first samples (eval_image keeps shard order)
    samples = {s["__key__"]: s for s in shard_samples(run / "shards/image_test/index.json", len(rows))}
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
    return "\n".join(textwrap.wrap(text, width)) or "<empty>"


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def _precision_note(run: Path) -> str:
    """How `dtype: auto` chose the training precision on this machine (RUN/precision.json), if it did."""
    f = run / "precision.json"
    if not f.exists():
        return ""
    rec = json.loads(f.read_text())
    if rec.get("bf16_speedup") is None:
        return f" Precision (`dtype: auto`): {rec['dtype']} ({rec.get('cpu')})."
    return (
        f" Precision (`dtype: auto`): bf16 matmuls measured {rec['bf16_speedup']:.2f}x fp32 on one thread, so "
        f"{rec['dtype']} (bf16 needs {BF16_MIN_SPEEDUP}x)."
    )


def stage_report(cfg, run) -> dict:
    # long: the report reads top to bottom as the page it writes
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    summ = json.loads((run / "eval/summary.json").read_text()) if (run / "eval/summary.json").exists() else {}

    def ev(name):
        f = run / "eval" / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else {}

    corp = json.loads((run / "shards/corpora.json").read_text())
    _plot_losses(run, run / "loss_curves.png")
    trained = eval_dtype(dataclasses.replace(cfg, eval_dtype=None), run)  # the files' record, else this CPU's choice
    evaluated = next((s["tower_dtype"] for s in summ.values() if "tower_dtype" in s), eval_dtype(cfg, run))
    img, vid, sp, cf = ev("image"), ev("video"), ev("speech"), ev("conformer")
    if img.get("rows"):
        _caption_grid(run, img["rows"], run / "caption_grid.png")
    q = ev("qualitative")
    L = [
        "# mm_llama demo report",
        "",
        f"Frozen tower: SmolLM2-135M ({cfg.tower}), trained in {trained}, "
        f"evaluated in {evaluated}; {cfg.nproc} processes of our DDP engine "
        f"(`accelerate launch`, gloo); {os.cpu_count()} CPU cores ({cpu_kernel_path()}), torch {torch.__version__}."
        + _precision_note(run),
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    L += [f"| {k} | {v['seconds']:.0f} |" for k, v in timings.items()]
    L += [f"| **total** | **{sum(v['seconds'] for v in timings.values()):.0f}** |", ""]
    L += ["## Data", "", "| corpus | samples |", "|---|---:|"]
    L += [f"| {k} | {v['samples']} |" for k, v in corp.items() if isinstance(v, dict) and "samples" in v]
    w = corp.get("speech_words", {})
    L += [
        "",
        "Speech: sentences of a spoken-language grammar over the demo's world (`data.corpora.spoken_sentences`, "
        f"{corp.get('speech_grammar_words')} words) and open-vocabulary fortune sentences; {w.get('corpus')} "
        f"distinct words ({w.get('train')} in training, {w.get('test')} in the test "
        f"set, {w.get('test_words_unseen_in_train')} test words never heard in training); sentences shared between "
        f"train and test: {corp.get('speech_sentence_overlap')}. Training voices: "
        f"{', '.join(corp.get('speech_voices', {}).get('train', []))}. Test voices (unseen): "
        f"{', '.join(corp.get('speech_voices', {}).get('test', []))}.",
        "",
    ]
    dlg = ev("dialogue")
    speech_rows = ("speech_open", "speech_unseen", "speech_real", "speech_joined")
    sections = {"image": img, "video": vid, "speech": sp} | {k: ev(k) for k in speech_rows}
    L += results_table(summ, timings, sections | {f"dialogue {k}": {"n": dlg.get(f"n_{k}")} for k in KINDS})
    refs = {"domain": "", "open-vocabulary": "_open", "flite-read domain": "_unseen", "real-speech": "_real"}
    for name, ref in ((name, ev(f"asr_reference{tag}")) for name, tag in refs.items()):
        if ref:
            L += [
                f"Reference: the complete pretrained Whisper tiny.en with its own decoder on the same {name} clips "
                f"(`make asr-reference`): WER {_pct(ref['wer'])}."
            ]
    L += ["", "![loss curves: one panel per stage](loss_curves.png)", ""]
    if dlg.get("rows"):
        L += _dialogue_section(run, dlg["rows"], dlg.get("by_question", {}))
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
            L += [
                f"## ASR: {name}",
                "",
                "WER by unseen voice: " + ", ".join(f"{v} {_pct(x)}" for v, x in res["by_voice"].items()),
                "",
                "| voice | reference | transcript |",
                "|---|---|---|",
            ]
            L += [f"| {r['voice']} | {r['ref']} | {r['hyp']} |" for r in res["rows"][:: max(1, len(res["rows"]) // 10)]]
            L += [""]
    if q:
        L += ["## Real photos and clips (out of domain: the adapters only ever saw Fashion-MNIST)", ""]
        L += [f'- ![{p["name"]}]({p["file"]}) {p["name"]}: "{p["caption"]}"' for p in q.get("photos", [])]
        L += [f'- clip {c["name"]}: "{c["caption"]}"' for c in q.get("clips", [])]
        L += [""]
    tp = resolve(cfg.tower)
    a = {n: f"--adapter {run}/{n}/adapter.safetensors" for n in ("image", "video", "speech")}
    d = " ".join(f"--adapter {f}" for f in dialogue_files(run))
    L += [
        "## Try it",
        "",
        "All three adapters compose on one tower; each file gets the answer its kind calls for:",
        "",
        "```bash",
        f"mm-llama caption --model {tp} {a['image']} {a['video']} {a['speech']} IMAGE.png CLIP.mp4 SPEECH.wav",
        "```",
        "",
        "Questions, typed or spoken, go to the dialogue stage's adapters (the chat page: `mm-llama serve`):",
        "",
        "```bash",
        f'mm-llama ask {d} IMAGE.png --prompt "what is at the top left?"',
        f"mm-llama ask {d} IMAGE.png QUESTION.wav",
        f"mm-llama serve {d}",
        "```",
        "",
    ]
    (run / "report.md").write_text("\n".join(L))
    print(f"  wrote {run / 'report.md'}", flush=True)
    return {k: {m: v for m, v in s.items() if m != "seconds"} for k, s in summ.items()}
