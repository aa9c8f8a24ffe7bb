"""The demo's settings (`DemoConfig`: defaults are the full demo; `--config` YAML / key=value change them) and the
helpers every stage shares: precision on this CPU, the frozen tower, held-out shards."""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_llama.adapters.files import trained_tower_dtype
from mm_llama.assets import resolve
from mm_llama.config import bounded, choice
from mm_llama.cpu import cpu_has_bf16, cpu_kernel_path
from mm_llama.data.shards import read_index, read_samples
from mm_llama.llama import Tokenizer, load_pretrained

from ..catalog import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = CONFIGS / "demo"  # STAGE.yaml: how each training stage trains (recipes/demo/stages.py)


def stage_config(name: str) -> Path:
    return STAGE_CONFIGS / f"{name}.yaml"


@dataclass
class DemoConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    nproc: int = 2  # DDP processes (accelerate launch)
    tower: str = "asset:smollm2_gguf"
    # the frozen tower's weights (and autocast) in training: "auto" = bf16 where this CPU's bf16 matmuls measure
    # faster than fp32 (`precision_choice`: a 2-core AMD EPYC with avx512_bf16 ~2x; an Intel Xeon with AVX-512 bf16
    # but no AMX 0.6x, the image stage half as fast as in fp32), fp32 elsewhere; bfloat16 / float32 force one
    # (bfloat16 still falls back to fp32 on CPUs without bf16 units, which emulate it ~45x slower)
    dtype: str = choice("auto", "auto", "bfloat16", "float32")
    # corpora
    image_train: int = 8000
    image_test: int = 500
    # of the image training composites, the share with two items (the row / column / diagonal templates; the rest
    # have three or four); None: 2-4 items evenly, as in the held-out set. With the earlier column template ("on the
    # left, a X above a Y") the layout errors were two-item columns vs diagonals and 0.5 did not settle them (seed 1:
    # 94.8% count+layout, 93.8% evenly); the column caption now parts from the diagonal after the first item
    # (scenes.composite_caption), so the default stays even
    image_two_item_share: float | None = bounded(None, 0.0, 1.0)
    video_train: int = 3000
    # one item per clip: the draw itself moves video.item_right. One fixed classifier read the 400-clip draws of seeds
    # 0-2 at 93.0 / 93.2 / 90.8% and their 1,200-clip draws at 93.0 / 92.5 / 92.9% (benchmarks/demo_video_draws.py)
    video_test: int = 1200
    # the spoken-language domain (corpora.spoken_sentences), espeak-ng voices + piper; 2,000 clips with half of them
    # augmented read the flite set at 30.8% WER, 3,000 with 60% (and 600 CTC steps) at 24.6% (docs/demo.md)
    speech_train: int = 3000
    speech_test: int = 200  # unseen sentences, unseen espeak-ng voices
    piper_train: int = 100  # of speech_train, read by the neural piper voice
    speech_open_train: int = 0  # open-vocabulary fortune sentences mixed into the speech training set
    speech_open_test: int = 200  # the open-vocabulary row: held-out fortune sentences, unseen voices
    # of the speech training clips, the share that sounds like another recording (data.audio.augment_speech: speed,
    # telephone band, room, noise, level), so the adapter learns speech rather than its two engines' acoustics
    speech_augment: float = bounded(0.6, 0.0, 1.0)
    # of the speech training clips, how often one goes on with a second sentence in the same voice after a pause
    # (corpora.join_sentences: 0.4 -> 17% of the clips hold two, when their words fit in an 8 s piece), so a short
    # file of two sentences is not answered as one (before: 75% WER on such files, 5% one by one; docs/demo.md)
    speech_joined: float = bounded(0.4, 0.0, 1.0)
    speech_joined_test: int = bounded(100, 0)  # held-out clips of two held-out sentences each, unseen voices
    # the domain's test sentences read by flite, a TTS engine used in no training set (voices.FLITE_VOICES)
    speech_unseen_test: int = bounded(200, 0)
    # the dialogue stage's conversations (recipes/demo/dialogue.py): training ones, shared out over the four kinds
    # (dialogue.TRAIN_SHARES), and held-out questions of each kind
    dialogue_train: int = bounded(5000, 0)
    dialogue_test: int = bounded(250, 0)
    # encoder pretraining (plain classifier): the captioners read it frozen, so its accuracy caps their item figures.
    # 6,000 steps: 92.4% on AMD seed 2 (bf16; 3,000: 91.1%) and 92.0% on an Intel Xeon, seed 0 (fp32; 3,000: 90.7%),
    # where image items rose from 89.6% to 91.0%; it costs about 200 s on the AMD EPYC, 520 s on the Xeon (issue 21)
    encoder_steps: int = 6000
    encoder_batch: int = 32
    # label smoothing of the item loss: 91.9 / 92.1 / 91.1% held-out items for seeds 0-2, none 91.2 / 91.2 / 90.7%,
    # 0.2 91.6% (seed 0; benchmarks/demo_encoder.py --smooth, bf16)
    encoder_smoothing: float = bounded(0.1, 0.0)
    # the from-scratch Conformer comparison (stages conformer_ctc, conformer and its evaluation, about 5 minutes on 2
    # cores with bf16 units): off by default so make demo fits its 30 minutes; conformer=true runs it
    conformer: bool = False
    # make demo-speech-open: the LegoSLM ablation (stage speech_lego: phase 2 with the tower reading CTC posteriors
    # over its token table instead of the rows; evaluated as lego_*)
    speech_ablation: bool = False
    eval_limit: int | None = None  # cap each held-out set (reduced runs)
    # None: the precision the adapters were trained in (bf16 tower weights + autocast on capable CPUs)
    eval_dtype: str | None = choice(None, None, "bfloat16", "float32")
    max_new_tokens: int = 40
    dialogue_max_new_tokens: int = 12  # answers are a few words
    # stage -> key=value overrides of its training config (recipes/configs/demo/STAGE.yaml, the one source of how
    # each stage trains), e.g. {"image": ["steps=8", "data.batch_size=4"]} (the reduced demo)
    stages: dict = field(default_factory=dict)


@functools.cache
def bf16_speedup(reps: int = 5) -> float:
    """How much faster this CPU multiplies tower-shaped matrices in bf16 than in fp32 on one thread (each training
    process runs one): the median over `reps` timings of [512, 576] x [576, 1536] (SmolLM2's FFN), both ways."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(512, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
            (a @ b).sum()  # the kernel's first call compiles it
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(8):
                    a @ b
                runs.append(time.perf_counter() - t)
            times[dt] = statistics.median(runs)
        return times[torch.float32] / times[torch.bfloat16]
    finally:
        torch.set_num_threads(threads)


BF16_MIN_SPEEDUP = 1.2  # below this, fp32 (exact, no autocast) is the better deal


def precision_choice(run: Path | None = None) -> dict:
    """`dtype: auto` on this machine: {"dtype", "bf16_speedup", "cpu"}. CUDA: bf16. CPU: bf16 where its bf16 units
    measure at least BF16_MIN_SPEEDUP x fp32 (`bf16_speedup`), else fp32. The first choice in a run folder is kept in
    RUN/precision.json, so every stage of a run (and a resumed run) trains in the same precision."""

    rec = Path(run) / "precision.json" if run is not None else None
    if rec is not None and rec.exists():
        return json.loads(rec.read_text())
    if torch.cuda.is_available():
        choice_ = {"dtype": "bfloat16", "bf16_speedup": None, "cpu": "CUDA"}
    else:
        speed = round(bf16_speedup(), 2) if cpu_has_bf16() else None
        dtype = "bfloat16" if speed is not None and speed >= BF16_MIN_SPEEDUP else "float32"
        choice_ = {"dtype": dtype, "bf16_speedup": speed, "cpu": cpu_kernel_path()}
    if rec is not None:
        rec.parent.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps(choice_))
    return choice_


def device_ok_dtype(cfg: DemoConfig, run: Path | None = None) -> str:
    """The precision the stages train in: `dtype`, or for "auto" the measured choice (`precision_choice`, kept in
    the run folder when `run` is given)."""
    if cfg.dtype == "auto":
        return precision_choice(run)["dtype"]
    if cfg.dtype == "bfloat16" and not torch.cuda.is_available() and not cpu_has_bf16():
        return "float32"  # CPUs without bf16 units emulate it slowly
    return cfg.dtype


def adapter_files(run: Path) -> list[Path]:
    """The run's trained adapter files (image, video, speech, Conformer speech) that exist."""
    return [
        f for n in ("image", "video", "speech", "conformer") if (f := Path(run) / n / "adapter.safetensors").exists()
    ]


def dialogue_files(run: Path) -> list[Path]:
    """The adapters the dialogue is answered with (`mm-llama ask --adapter ...` of each): the dialogue stage's image
    and video parts and the speech stage's adapter (frozen in the dialogue stage)."""
    run = Path(run)
    return [run / "dialogue/adapter-image.safetensors", run / "dialogue/adapter-video.safetensors",
            run / "speech/adapter.safetensors"]  # fmt: skip


def eval_dtype(cfg, run: Path | None = None) -> str:
    """The frozen tower's dtype for evaluation: `eval_dtype` when set, else the one the run's adapter files record
    they were trained on (`tower_dtype`; the same rule as `mm-llama caption --dtype auto`), so a run trained on a CPU
    with bf16 units is evaluated on its bf16 tower on any CPU; without adapter files, the precision this CPU trains
    in."""
    if cfg.eval_dtype:
        return cfg.eval_dtype
    files = adapter_files(run) if run is not None else []
    if files:
        return trained_tower_dtype(files)
    return device_ok_dtype(cfg, run)


def load_tower(cfg):
    """The frozen tower for evaluation, loaded in fp32 (the adapters compose on it in fp32); `_load_models` then puts
    its weights in the trained dtype (`eval_dtype`); answers compute under autocast of it (as training did)."""

    tower = load_pretrained(resolve(cfg.tower), dtype=torch.float32)
    return tower.requires_grad_(False).eval(), Tokenizer.from_pretrained(resolve(cfg.tower))


def shard_samples(index: Path, limit: int | None = None) -> list[dict]:
    return read_samples(read_index(index)[0], limit or None)
