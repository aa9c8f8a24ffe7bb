"""The reduced end-to-end demo (recipes/configs/demo/tiny.yaml): every stage of `make demo` on tiny corpora with a
few steps of 2-process DDP training through `accelerate launch`, run ONCE for this module; each test checks one
concern of that run. The full demo is not part of `make test`."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_llama.adapters.files import trained_tower_dtype
from mm_llama.cli import main as cli_main
from mm_llama.config import load_config
from recipes.demo import DONE, STAGES, DemoConfig
from recipes.demo import config as dc
from recipes.demo.config import BF16_MIN_SPEEDUP, adapter_files, dialogue_files, eval_dtype, load_tower
from recipes.demo.dialogue import KINDS, read_test_set
from recipes.demo.evaluation import _load_models
from recipes.demo.figures import CONTRACT, FIGURES, TARGETS, seed_markdown, tabulate
from recipes.demo.scenes import parse_composite_caption
from recipes.demo.seeds import main
from recipes.demo.speech_open import CONFIG as OPEN_CONFIG
from recipes.demo.speech_open import EVALS as OPEN_EVALS
from recipes.demo.speech_open import TABLE as OPEN_TABLE
from recipes.demo.voices import real_speech_records
from recipes.train import load_train_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes/configs/demo/tiny.yaml"
DEMO = [sys.executable, "-m", "recipes.demo", "--config", str(TINY)]
ENV = {**os.environ, "MM_LLAMA_PG_TIMEOUT": "120"}


def run(*args):
    r = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=ENV)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(run folder, the demo's output, summary.json) of one reduced demo."""
    folder = tmp_path_factory.mktemp("demo")
    out = run(f"run_dir={folder}")
    return folder, out, json.loads((folder / "eval/summary.json").read_text())


def test_every_stage_ran_and_is_timed(demo):
    folder, out, _ = demo
    for stage in STAGES:
        assert (folder / DONE[stage]).exists(), stage
        assert f"[{stage}] done in" in out
    timings = json.loads((folder / "timings.json").read_text())
    assert list(timings) == STAGES and all(v["seconds"] > 0 for v in timings.values())


def test_corpora_keep_test_sentences_and_voices_apart(demo):
    folder, _, _ = demo
    corpora = json.loads((folder / "shards/corpora.json").read_text())
    assert corpora["image_train"]["samples"] == 96 and corpora["speech_sentence_overlap"] == 0
    assert not set(corpora["speech_voices"]["train"]) & set(corpora["speech_voices"]["test"])
    # the speech stages trained on the cached encoder outputs (every clip has them)
    cached = json.loads((folder / "shards/speech_train_enc/index.json").read_text())
    # some training clips hold two sentences (each sentence once), so there are fewer clips than sentences
    joined = corpora["speech_joined_clips"]
    assert cached["samples"] == corpora["speech_train"]["samples"] == 48 + 8 - joined and joined > 0


def test_each_training_stage_ran_its_own_config_and_the_loss_falls(demo):
    """Each stage trained its recipes/configs/demo/STAGE.yaml with the tiny config's overrides (one source), its live
    progress reached the demo's output, and its loss fell."""
    folder, out, _ = demo
    tiny = load_config(DemoConfig, TINY)
    for name in ("image", "video", "speech_ctc", "speech"):
        want = load_train_config(ROOT / f"recipes/configs/demo/{name}.yaml", tiny.stages[name])
        saved = load_train_config(folder / name / "config.yaml")
        assert (saved.steps, saved.data.batch_size, saved.optim.lr) == (want.steps, want.data.batch_size, want.optim.lr)
        losses = json.loads((folder / name / "losses.json").read_text())
        assert len(losses) == want.steps and sum(losses[-2:]) < sum(losses[:2]), (name, losses)
        assert f"[train] step {want.steps}/{want.steps} loss" in out, name
        assert (folder / name / "metrics.jsonl").exists() and (folder / name / "train.log").exists()
    assert "model.speech.encoder" not in out and "-m recipes.train --config" in out


def test_summary_holds_every_figure_of_the_table(demo):
    """summary.json has each target figure as a fraction (the contract keys) and the reference rows."""
    folder, _, summary = demo
    assert set(CONTRACT) == {
        "image.count_and_layout_right",
        "image.items_right",
        "video.direction_right",
        "video.item_right",
        "speech.wer",
        "speech.distinct_fraction",
        "speech_open.wer",
        "speech_unseen.wer",
        "dialogue.image_right",
        "dialogue.two_images_right",
        "dialogue.video_right",
        "dialogue.spoken_right",
    }
    for f in TARGETS:
        assert isinstance(f.value(summary), float), f.key
    assert {"image", "video", "speech", "speech_open", "speech_joined", "conformer", "classifier", "dialogue"} <= set(
        summary
    )
    assert summary["image"]["n"] == 4 and summary["speech"]["n"] == 4 and summary["speech_open"]["n"] == 4
    assert (folder / "encoder/heads.safetensors").exists() and "classifier_item_right" in summary["video"]


def test_figures_are_what_the_rows_say(demo):
    """Re-scoring the stored captions against their references gives the summary's image figure."""
    folder, _, summary = demo
    rows = json.loads((folder / "eval/image.json").read_text())["rows"]
    truths = [parse_composite_caption(r["ref"]) for r in rows]
    hits = [
        sum((parse_composite_caption(r["hyp"]) or {}).get(c) == v for c, v in t.items()) for r, t in zip(rows, truths)
    ]
    assert [r["items_right"] for r in rows] == hits
    assert summary["image"]["items_right"] == sum(hits) / sum(len(t) for t in truths)


def test_dialogue_figures_are_what_mm_llama_ask_answers(demo):
    """The held-out questions are a file `mm-llama ask` reads (contract: eval/dialogue_test.jsonl); asking it a
    question of each kind through the CLI gives the answer the figures were scored on."""
    folder, _, summary = demo
    lines = read_test_set(folder / "eval/dialogue_test.jsonl")
    rows = json.loads((folder / "eval/dialogue.json").read_text())["rows"]
    assert [{k: r[k] for k in lines[0]} for r in rows] == lines and {x["kind"] for x in lines} == set(KINDS)
    for kind in KINDS:
        got = [r["right"] for r in rows if r["kind"] == kind]
        assert summary["dialogue"][f"{kind}_right"] == sum(got) / len(got)
    adapters = [f"--adapter={f}" for f in dialogue_files(folder)]
    for r in [next(r for r in rows if r["kind"] == k) for k in ("two_images", "spoken")]:
        prompt = [] if r["kind"] == "spoken" else ["--prompt", r["question"]]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["ask", *adapters, *r["media"], *prompt, "--max-new-tokens", "12"]) == 0
        assert (out.getvalue().splitlines() or [""])[-1] == r["hyp"], r


def test_evaluation_uses_the_precision_the_files_record(demo):
    """`dtype: auto` measured this CPU once; every stage trained in its choice; evaluation composes the adapters in
    fp32 on the tower dtype their files record, whatever the config or this CPU would pick now."""
    folder, _, summary = demo
    recorded = trained_tower_dtype(adapter_files(folder))
    choice = json.loads((folder / "precision.json").read_text())
    assert recorded == ("bfloat16" if (choice["bf16_speedup"] or 0) >= BF16_MIN_SPEEDUP else "float32")
    assert {s["tower_dtype"] for k, s in summary.items() if k != "classifier"} == {recorded}
    cfg = load_config(DemoConfig, TINY, [f"run_dir={folder}", "dtype=float32"])
    assert eval_dtype(cfg, folder) == recorded and eval_dtype(cfg) == "float32"
    assert eval_dtype(dataclasses.replace(cfg, eval_dtype="bfloat16"), folder) == "bfloat16"  # explicit wins
    cfg = dataclasses.replace(cfg, eval_dtype="bfloat16")
    tower, _ = load_tower(cfg)
    models, dtype = _load_models(cfg, folder, tower)
    assert dtype == "bfloat16" and {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    tower_ids = {id(p) for p in tower.parameters()}
    for model in models.values():
        assert {p.dtype for p in model.parameters() if id(p) not in tower_ids} == {torch.float32}


def test_report_states_the_figures(demo):
    folder, _, summary = demo
    report = (folder / "report.md").read_text()
    assert "Precision (`dtype: auto`)" in report and "Time per stage" in report
    assert "fp32 fallback" in report or "bf16 via" in report  # the CPU's kernel path is named
    for f in FIGURES:
        if f.value(summary) is not None:
            assert f"| `{f.key}` | {f.what} | {f.target_text()} |" in report, f.key
    assert "## Dialogue: held-out exchanges" in report and "mm-llama ask --adapter" in report
    for png in ("loss_curves.png", "caption_grid.png", "dialogue_grid.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"


def test_finished_stages_are_skipped(demo):
    folder, _, _ = demo
    again = run(f"run_dir={folder}", "--stages", "image,conformer,report", "conformer=false")
    assert "[image] outputs exist" in again and "[report] outputs exist" in again
    assert "[conformer] off (conformer=false" in again  # the comparison is off by default (make demo's budget)


def test_auto_precision_is_measured_once_per_run(tmp_path, monkeypatch):
    """`dtype: auto` takes bf16 only where this CPU's bf16 matmuls measure BF16_MIN_SPEEDUP x fp32 (an Intel Xeon
    with AVX-512 bf16 but no AMX measured 0.6x: fp32 there); the first choice is kept in RUN/precision.json, so a
    resumed run trains on in the same precision whatever a new measurement says; bfloat16 / float32 force one."""

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
    """`make demo-seeds` tabulates each target figure over the seeds' summaries; a target holds only when it holds
    for the worst seed (lowest fraction right, highest WER); stretch targets and reference rows decide nothing."""

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
    assert (
        "| speech.wer | 5.0% | 12.0% | 7.0% | 8.0% | 5.0% | 12.0% | <= 10% | NO |"
        in (tmp_path / "seeds.md").read_text()
    )
    for seed, summ in sums.items():
        summ["speech"]["wer"] = 0.05
        summ["speech_open"] = {"wer": 1.9}
        summ["classifier"] = {"items_right": 0.924}
        (tmp_path / f"seed_{seed}/eval/summary.json").write_text(json.dumps(summ))
    assert main(["--table-only", "--root", str(tmp_path)]) == 0
    md = (tmp_path / "seeds.md").read_text()
    assert "| <= 60% (stretch) | NO (stretch) |" in md
    assert "| classifier.items_right | 92.4% | 92.4% | 92.4% | 92.4% | 92.4% | 92.4% | (reference) | |" in md
    assert md == seed_markdown(
        tabulate({s: json.loads((tmp_path / f"seed_{s}/eval/summary.json").read_text()) for s in sums})
    )


# --- make demo-speech-open (recipes/demo/speech_open.py), on the reduced demo's speech corpora and CTC adapter ---
OPEN = [sys.executable, "-m", "recipes.demo.speech_open"]
FEW = "data.batch_size=4,optim.warmup_steps=1,ckpt_every=2,data.num_workers=0,data.shuffle_buffer=8"


def run_open(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*OPEN, *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)


def test_speech_open_settings_write_where_the_contract_says():
    cfg = load_config(DemoConfig, OPEN_CONFIG)
    assert cfg.run_dir == "runs/demo-speech-open" and cfg.image_train == cfg.video_train == 0
    assert cfg.speech_open_train > cfg.speech_train and not cfg.speech_ablation
    names = [s.name for s in OPEN_TABLE]
    assert names == ["corpora", "speech_cache", "speech_ctc", "speech", "speech_lego", "evaluate"]
    r = run_open("--stages", "image", "run_dir=/nonexistent")  # a stage of the main demo is refused
    assert r.returncode == 2 and "unknown stage(s) ['image']" in r.stderr


def test_speech_open_corpora_are_speech_only(tmp_path):
    sizes = ["speech_train=8", "speech_open_train=8", "piper_train=0"]
    sizes += ["speech_open_test=2", "speech_test=2", "speech_unseen_test=2"]
    r = run_open("--stages", "corpora", f"run_dir={tmp_path}", *sizes)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    made = {p.parent.name for p in (tmp_path / "shards").glob("*/index.json")}
    assert made == {"speech_train", "speech_test", "speech_open_test", "speech_unseen_test", "speech_real_test"}
    assert json.loads((tmp_path / "shards/corpora.json").read_text())["speech_train"]["samples"] == 16


def test_speech_open_ablation_and_figures_through_the_cli(demo, tmp_path, capsys):
    """The LegoSLM stage trains from the CTC adapter, the evaluation writes every figure of the open run's table
    (contract: open.wer, domain.wer, real.wer as fractions), and `mm-llama asr` reads with its adapter."""
    folder, _, _ = demo
    run = tmp_path / "open"
    run.mkdir()
    for name in ("shards", "speech_ctc", "speech", "precision.json"):
        (run / name).symlink_to(folder / name)
    args = ["speech_ablation=true", "eval_limit=1", "max_new_tokens=4", "nproc=1"]
    args.append(f"stages.speech_lego=[steps=1,{FEW}]")
    r = run_open("--stages", "speech_lego,evaluate", f"run_dir={run}", *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    summary = json.loads((run / "eval/summary.json").read_text())
    assert set(summary) == set(OPEN_EVALS)
    assert all(isinstance(summary[k]["wer"], float) for k in OPEN_EVALS)
    assert summary["ctc_domain"]["n"] == 1 and summary["real"]["n"] == 1
    wav = tmp_path / "real.wav"
    wav.write_bytes(next(iter(real_speech_records()))["audio"][1])
    adapter = run / "speech_lego/adapter.safetensors"  # (the rows adapter: tests/integration/test_asr.py)
    args = ["asr", "--model", "asset:smollm2_gguf", "--adapter", str(adapter), str(wav), "--max-new-tokens=4"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.startswith(f"{wav}:")
