"""The reduced end-to-end demo (recipes/configs/demo/tiny.yaml): every stage of `make demo` on tiny corpora with a
few steps of 2-process DDP training through `accelerate launch`; the full demo is not part of `make test`."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "recipes.demo", "--config", str(ROOT / "recipes/configs/demo/tiny.yaml")]
ENV = {**os.environ, "MM_LLAMA_PG_TIMEOUT": "120"}


def run(*args):
    r = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=ENV)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout


def test_reduced_demo_every_stage(tmp_path):
    out = run(f"run_dir={tmp_path}")
    from recipes.demo import DONE, STAGES

    for stage in STAGES:
        assert (tmp_path / DONE[stage]).exists(), stage
        assert f"[{stage}] done in" in out
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert list(timings) == STAGES and all(v["seconds"] > 0 for v in timings.values())
    corpora = json.loads((tmp_path / "shards/corpora.json").read_text())
    assert corpora["image_train"]["samples"] == 96 and corpora["speech_sentence_overlap"] == 0
    # the loss falls in every adapter stage (captions and transcripts are learnable within a few steps)
    for name in ("image", "video", "speech_ctc", "speech"):
        losses = json.loads((tmp_path / name / "losses.json").read_text())
        assert len(losses) >= 6 and sum(losses[-2:]) < sum(losses[:2]), (name, losses)
        assert (tmp_path / name / "metrics.jsonl").exists() and (tmp_path / name / "train.log").exists()
    summary = json.loads((tmp_path / "eval/summary.json").read_text())
    assert set(summary) == {"image", "video", "speech", "speech_open", "conformer"}
    # contract figures (section.figure), each a fraction
    for sec, fig in [("image", "count_and_layout_right"), ("image", "items_right"), ("video", "direction_right"),
                     ("video", "item_right"), ("speech", "wer"), ("speech", "distinct_fraction"),
                     ("speech_open", "wer")]:  # fmt: skip
        assert isinstance(summary[sec][fig], float) and summary[sec][fig] >= 0, (sec, fig)
    assert summary["image"]["n"] == 4
    # the plain classifier's reading of the same held-out clips (the encoder stage keeps its heads): the reference
    assert (tmp_path / "encoder/heads.safetensors").exists() and 0 <= summary["video"]["classifier_item_right"] <= 1
    # the figure is what the per-sample rows say: re-score the stored captions against their references
    from mm_llama.data.corpora import parse_composite_caption

    rows = json.loads((tmp_path / "eval/image.json").read_text())["rows"]
    truths = [parse_composite_caption(r["ref"]) for r in rows]
    hits = [
        sum((parse_composite_caption(r["hyp"]) or {}).get(c) == v for c, v in t.items()) for r, t in zip(rows, truths)
    ]
    assert [r["items_right"] for r in rows] == hits
    assert summary["image"]["items_right"] == sum(hits) / sum(len(t) for t in truths)
    assert summary["speech"]["n"] == 4 and summary["speech_open"]["n"] == 4
    # the speech stage trained on the cached encoder outputs (every clip has them) with the CTC loss on
    cached = json.loads((tmp_path / "shards/speech_train_enc/index.json").read_text())
    assert cached["samples"] == corpora["speech_train"]["samples"] == 48 + 8
    assert "model.speech.encoder=whisper:" in out
    # evaluation composes the adapters in fp32 on the tower dtype their files record (bf16 weights where trained so),
    # whatever the config or this CPU would pick now
    import dataclasses

    import torch

    from mm_llama.adapters.files import trained_tower_dtype
    from mm_llama.config import load_config
    from recipes.demo import DemoConfig
    from recipes.demo.config import BF16_MIN_SPEEDUP, adapter_files, eval_dtype, load_tower
    from recipes.demo.evaluation import _load_models

    # `dtype: auto` measured this CPU once and every stage trained in its choice
    recorded = trained_tower_dtype(adapter_files(tmp_path))
    choice = json.loads((tmp_path / "precision.json").read_text())
    assert recorded == choice["dtype"]
    assert recorded == ("bfloat16" if (choice["bf16_speedup"] or 0) >= BF16_MIN_SPEEDUP else "float32")
    assert "Precision (`dtype: auto`)" in (tmp_path / "report.md").read_text()
    assert {s["tower_dtype"] for s in summary.values()} == {recorded}
    cfg = load_config(DemoConfig, ROOT / "recipes/configs/demo/tiny.yaml", [f"run_dir={tmp_path}", "dtype=float32"])
    assert eval_dtype(cfg, tmp_path) == recorded  # not the config's float32: the files say what was trained
    assert eval_dtype(cfg) == "float32"  # no run given: the config's precision
    assert eval_dtype(dataclasses.replace(cfg, eval_dtype="bfloat16"), tmp_path) == "bfloat16"  # explicit wins
    cfg = load_config(
        DemoConfig, ROOT / "recipes/configs/demo/tiny.yaml", [f"run_dir={tmp_path}", "eval_dtype=bfloat16"]
    )
    tower, _ = load_tower(cfg)
    models, dtype = _load_models(cfg, tmp_path, tower)
    assert dtype == "bfloat16" and {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    tower_ids = {id(p) for p in tower.parameters()}
    for model in models.values():
        adapter = [p for p in model.parameters() if id(p) not in tower_ids]
        assert adapter and {p.dtype for p in adapter} == {torch.float32}
    report = (tmp_path / "report.md").read_text()
    assert "Results on held-out data" in report and "Time per stage" in report
    assert "fp32 fallback" in report or "bf16 via" in report  # the CPU's kernel path is named
    # live progress of each training stage reaches the demo's output (one line per ~30 s, and the last step)
    for name in ("image", "video", "speech"):
        steps = getattr(cfg, f"{name}_steps")  # the tiny config's
        assert f"[train] step {steps}/{steps} loss" in out, name
    for png in ("loss_curves.png", "caption_grid.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # stages whose outputs exist are skipped
    again = run(f"run_dir={tmp_path}", "--stages", "image,conformer,report", "conformer=false")
    assert "[image] outputs exist" in again and "[report] outputs exist" in again
    assert "[conformer] off (conformer=false" in again  # the comparison is off by default (make demo's budget)


def test_auto_precision_is_measured_once_per_run(tmp_path, monkeypatch):
    """`dtype: auto` takes bf16 only where this CPU's bf16 matmuls measure BF16_MIN_SPEEDUP x fp32 (an Intel Xeon
    with AVX-512 bf16 but no AMX measured 0.6x: fp32 there); the first choice is kept in RUN/precision.json, so a
    resumed run trains on in the same precision whatever a new measurement says; bfloat16 / float32 force one."""
    import dataclasses

    from recipes.demo import DemoConfig
    from recipes.demo import config as dc

    cfg = DemoConfig(run_dir=str(tmp_path))
    assert cfg.dtype == "auto"
    monkeypatch.setattr(dc, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dc, "bf16_speedup", lambda: 0.62)
    assert dc.device_ok_dtype(cfg) == "float32"
    monkeypatch.setattr(dc, "bf16_speedup", lambda: 1.9)
    assert dc.device_ok_dtype(cfg, tmp_path) == "bfloat16"
    assert json.loads((tmp_path / "precision.json").read_text())["bf16_speedup"] == 1.9
    monkeypatch.setattr(dc, "bf16_speedup", lambda: 0.5)  # the machine got slower: the run keeps its precision
    assert dc.device_ok_dtype(cfg, tmp_path) == "bfloat16" and dc.eval_dtype(cfg, tmp_path) == "bfloat16"
    assert dc.device_ok_dtype(dataclasses.replace(cfg, dtype="float32"), tmp_path) == "float32"
    monkeypatch.setattr(dc, "cpu_has_bf16", lambda: False)  # no bf16 units: not even measured
    assert dc.precision_choice() == {"dtype": "float32", "bf16_speedup": None, "cpu": dc.cpu_kernel_path()}
    assert dc.device_ok_dtype(dataclasses.replace(cfg, dtype="bfloat16")) == "float32"


def test_seed_table_takes_the_worst_seed(tmp_path):
    """`make demo-seeds` tabulates each contract figure over the seeds' summaries; a target holds only when it holds
    for the worst seed (lowest fraction right, highest WER)."""
    from recipes.demo.seeds import main, tabulate

    sums = {
        0: {"speech": {"wer": 0.05, "distinct_fraction": 1.0}, "image": {"items_right": 0.93}},
        1: {"speech": {"wer": 0.12, "distinct_fraction": 0.97}, "image": {"items_right": 0.91}},
        2: {"speech": {"wer": 0.07, "distinct_fraction": 0.99}, "image": {"items_right": 0.92}},
    }
    t = tabulate(sums)
    assert t["speech.wer"]["worst"] == 0.12 and not t["speech.wer"]["holds"]
    assert t["speech.distinct_fraction"]["worst"] == 0.97 and t["speech.distinct_fraction"]["holds"]
    assert t["image.items_right"]["min"] == 0.91 and t["image.items_right"]["holds"]
    assert abs(t["speech.wer"]["mean"] - 0.08) < 1e-9 and "video.item_right" not in t
    for seed, summ in sums.items():
        (tmp_path / f"seed_{seed}/eval").mkdir(parents=True)
        (tmp_path / f"seed_{seed}/eval/summary.json").write_text(json.dumps(summ))
    assert main(["--table-only", "--root", str(tmp_path)]) == 1  # speech.wer fails at seed 1
    md = (tmp_path / "seeds.md").read_text()
    assert "| speech.wer | 5.0% | 12.0% | 7.0% | 8.0% | 5.0% | 12.0% | <= 10% | NO |" in md
    # the open-vocabulary row's target is a stretch target: tabulated, but it does not decide the exit status
    for seed, summ in sums.items():
        summ["speech"]["wer"] = 0.05
        summ["speech_open"] = {"wer": 1.9}
        (tmp_path / f"seed_{seed}/eval/summary.json").write_text(json.dumps(summ))
    assert main(["--table-only", "--root", str(tmp_path)]) == 0
    assert "| <= 60% | NO (stretch) |" in (tmp_path / "seeds.md").read_text()
    # reference rows (the plain classifier on composites and on clips) are tabulated without a target
    (tmp_path / "seed_0/encoder").mkdir()
    (tmp_path / "seed_0/encoder/classifier.json").write_text(json.dumps({"item_accuracy": 0.924}))
    sums[0]["video"] = {"classifier_item_right": 0.5, "item_right": 0.95}
    (tmp_path / "seed_0/eval/summary.json").write_text(json.dumps(sums[0]))
    assert main(["--table-only", "--root", str(tmp_path)]) == 0  # a low reference fails nothing
    md = (tmp_path / "seeds.md").read_text()
    assert "| classifier.items_right | 92.4% | - | - | 92.4% | 92.4% | 92.4% | (reference) | |" in md
    assert "| video.classifier_item_right | 50.0% |" in md and "| video.item_right | 95.0% |" in md
