"""ONE training recipe for image and speech adapters on a frozen Llama 3 tower (video: next step).

    python recipes/train.py --config recipes/configs/debug_image.yaml [key=value ...]
    torchrun --nproc_per_node 2 recipes/train.py --config ... engine=ours
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py --config ...

Stages: batch iterator (webdataset stream, resumable) -> forward_backward (micro-batches, no_sync for
accumulation) -> train_step (clip, AdamW step, warmup + cosine schedule; non-finite losses skipped and counted)
-> train (checkpoints, metrics JSONL, progress bar on rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.config import load_config, save_config


@dataclass
class TowerCfg:
    path: str | None = None  # Meta dir | HF dir | .gguf; None: a random preset (tests, debug)
    preset: str = "debug"
    vocab_size: int | None = None  # random preset: match the tokenizer's vocabulary
    seed: int = 0


@dataclass
class ModelCfg:
    modality: str = "image"  # image | speech | video
    tokenizer: str = ""
    vision: str = "debug"  # image encoder preset
    vision_init: str | None = None  # safetensors of pretrained image-encoder weights (VisionEncoder names)
    freeze_vision: bool = False  # train only projection + cross-attention (+ token rows) on a pretrained encoder
    xattn_every: int = 4  # image cross-attention before every N-th tower layer (counted from the top)
    xattn_count: int | None = None  # only the top N of those (None: all): backward then stops at the lowest one
    train_token_rows: bool = True  # the new tokens' embedding rows; frozen, the tower below the first block is
    #                                forward-only
    speech_encoder: str = "conformer:debug"  # conformer:PRESET | whisper:PATH
    speech_adapter: str = "debug"
    freeze_speech_encoder: bool = False
    image_adapter: str | None = None  # video stage: the trained image adapter to start from (frozen)
    video_frames: int = 8
    video_merge: int = 4  # frames per effective frame (32 for 64-frame SFT input, 16 for pretraining)
    video_heads: int = 4
    video_every: int = 4  # a video block before every N-th image block (counted from the top)
    video_query_init: str = "learned"  # aggregator start: learned | frame_mean (adapters/video.py)
    video_max_groups: int = 0  # > 0: order embeddings for up to this many effective frames
    video_init_from_image: bool = False  # video blocks start as copies of the image blocks at their layers


@dataclass
class DataCfg:
    train: str = ""
    batch_size: int = 2
    num_workers: int = 0
    shuffle_buffer: int = 16
    max_bad_fraction: float = 0.01
    prompt: str = ""
    max_text_tokens: int = 64
    split: str = "shards"  # shards | interleave (N ranks x B/N == 1 rank x B, for checks) | none (same stream)


@dataclass
class OptimCfg:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 2
    grad_accum: int = 1
    clip: float = 1.0
    max_nonfinite: int = 5


@dataclass
class TrainConfig:
    run_dir: str = "runs/debug"
    steps: int = 10
    seed: int = 0
    engine: str = "ours"  # ours | torch
    bucket_cap_mb: float = 25.0
    log_every: int = 1
    ckpt_every: int = 5
    keep_last: int = 3
    resume: str = "auto"  # auto | none | a checkpoint folder
    dtype: str = "auto"  # frozen tower dtype: auto = bfloat16 on CUDA, float32 on CPU
    activation_checkpointing: bool = False
    stop_after: int | None = None  # stop (as if killed) after this many steps: resume tests
    profile: bool = False  # torch profiler trace of steps 2-4 into RUN/profile/
    tensorboard: bool = True
    peak_tflops: float | None = None  # for MFU; default: 0.1 on CPU, 989 (H100 bf16 dense) on CUDA
    debug_nan_steps: list = field(default_factory=list)  # inject non-finite losses at these steps (tests)
    debug_kill_rank: int = -1  # SIGKILL this rank at debug_kill_step (robustness tests)
    debug_kill_step: int = -1
    tower: TowerCfg = field(default_factory=TowerCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)


# ----------------------------------------------------------------------------------------------
# building


def build_tower(cfg: TrainConfig):
    from mm_llama.llama import Transformer, get_preset, load_pretrained

    if cfg.tower.path:
        return load_pretrained(resolve(cfg.tower.path))
    args = get_preset(cfg.tower.preset)
    if cfg.tower.vocab_size:
        args = args.replace(vocab_size=cfg.tower.vocab_size)
    tower = Transformer(args)
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(cfg.tower.seed))
    return tower.requires_grad_(False).eval()


def build_model(cfg: TrainConfig, tower):
    m = cfg.model
    if m.modality == "image":
        from mm_llama.adapters.builders import attach_image_adapter

        model = attach_image_adapter(tower, m.vision, every=m.xattn_every, n_xattn=m.xattn_count)
        model.learnable_embedding.requires_grad_(m.train_token_rows)
        if m.vision_init:
            from safetensors.torch import load_file

            model.vision_encoder.load_state_dict(load_file(resolve(m.vision_init)))
        if m.freeze_vision:
            model.vision_encoder.requires_grad_(False)
        return model
    if m.modality == "speech":
        from mm_llama.adapters.asr import build_speech_model
        from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
        from mm_llama.adapters.whisper import load_whisper_encoder

        kind, _, arg = m.speech_encoder.partition(":")
        enc = ConformerEncoder(CONFORMER_PRESETS[arg]) if kind == "conformer" else load_whisper_encoder(resolve(arg))
        return build_speech_model(tower, enc, ADAPTER_PRESETS[m.speech_adapter], freeze_encoder=m.freeze_speech_encoder)
    if m.modality == "video":
        from mm_llama.adapters.builders import attach_image_adapter
        from mm_llama.adapters.checkpoint import load_adapter
        from mm_llama.adapters.video import AggregatorArgs, FusedVideoModel

        image = (
            load_adapter(tower, resolve(m.image_adapter)) if m.image_adapter else attach_image_adapter(tower, m.vision)
        )
        agg = AggregatorArgs(merge=m.video_merge, heads=m.video_heads, query_init=m.video_query_init,
                             max_groups=m.video_max_groups)  # fmt: skip
        return FusedVideoModel(image, agg, every=m.video_every, init_from_image=m.video_init_from_image)
    raise ValueError(f"model.modality must be image, speech or video, not {m.modality!r}")


class SampleMaker:
    """raw webdataset sample -> training item (runs in DataLoader workers; picklable)."""

    def __init__(self, cfg: TrainConfig, model, tok):
        self.modality, self.prompt, self.max_text = cfg.model.modality, cfg.data.prompt, cfg.data.max_text_tokens
        self.tok = tok
        if self.modality == "image":
            self.image_size = model.vision_encoder.args.image_size
            self.image_token = model.image_token_id
        elif self.modality == "video":
            self.image_size = model.image_model.vision_encoder.args.image_size
            self.video_token = model.video_token_id
            self.frames = cfg.model.video_frames
        else:
            self.placeholder = model.placeholder_id
            self.whisper = type(model.encoder).__name__ == "WhisperEncoder"
            self.expected = model.expected_speech_tokens

    def __call__(self, raw: dict) -> dict:
        from mm_llama.data.badsamples import SampleError
        from mm_llama.data.collate import build_example

        if "txt" not in raw:
            raise SampleError("missing_text", f"{raw['__shard__']}:{raw['__key__']}: no .txt")
        target = self.tok.encode(" " + raw["txt"].decode("utf-8").strip())[: self.max_text] + [self.tok.eos_id]
        from mm_llama.generate import bos_prefix

        bos = bos_prefix(self.tok)
        if self.modality == "image":
            from mm_llama.data.image import IMAGE_EXTS, decode_image, resize_plain

            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                raise SampleError("missing_image", f"{raw['__shard__']}:{raw['__key__']}: no image member")
            pixels = resize_plain(decode_image(raw[ext], raw["__key__"]), self.image_size)
            prompt = bos + [self.image_token] + self.tok.encode(self.prompt)
            return {**build_example(prompt, target), "pixels": pixels}
        if self.modality == "video":
            from mm_llama.data.image import normalize_tiles
            from mm_llama.data.video import VIDEO_EXTS, decode_video

            ext = next((e for e in VIDEO_EXTS if e in raw), None)
            if ext is None:
                raise SampleError("missing_video", f"{raw['__shard__']}:{raw['__key__']}: no video member")
            frames = decode_video(raw[ext], raw["__key__"], num_frames=self.frames, size=self.image_size)
            prompt = bos + [self.video_token] + self.tok.encode(self.prompt)
            return {**build_example(prompt, target), "video": normalize_tiles(frames)}
        from mm_llama.adapters.asr import ASR_PROMPT
        from mm_llama.data.audio import AUDIO_EXTS, decode_audio, log_mel

        ext = next((e for e in AUDIO_EXTS if e in raw), None)
        if ext is None:
            raise SampleError("missing_audio", f"{raw['__shard__']}:{raw['__key__']}: no audio member")
        wave = decode_audio(raw[ext], raw["__key__"], ext)
        if self.whisper:
            from mm_llama.adapters.whisper import whisper_log_mel

            feats = whisper_log_mel(wave).transpose(0, 1)
        else:
            feats = log_mel(wave)
        n = int(self.expected(torch.tensor([feats.shape[0]]))[0])
        prompt = bos + self.tok.encode(ASR_PROMPT.format(language="English")) + [self.placeholder] * n
        return {**build_example(prompt, target), "features": feats}


def collate(items: list[dict]) -> dict:
    from mm_llama.data.collate import collate_text

    out = collate_text(items, pad_id=0)
    if "pixels" in items[0]:
        out["pixels"] = torch.stack([it["pixels"] for it in items])
    if "video" in items[0]:
        out["videos"] = [it["video"] for it in items]
    if "features" in items[0]:
        lens = torch.tensor([it["features"].shape[0] for it in items])
        feats = torch.zeros(len(items), int(lens.max()), items[0]["features"].shape[1])
        for b, it in enumerate(items):
            feats[b, : it["features"].shape[0]] = it["features"]
        out["features"], out["feature_lengths"] = feats, lens
    return out


def _checkpoint_tower_layers(tower) -> None:
    """Recompute each frozen tower layer in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in tower.layers:
        fwd = layer.forward
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def forward_loss(model, batch) -> tuple[torch.Tensor, int]:
    dev = next(p for p in model.parameters()).device
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    ids, labels = batch["input_ids"], batch["labels"]
    select = torch.zeros_like(labels, dtype=torch.bool)  # logits only where the next token is a label
    select[:, :-1] = labels[:, 1:] != -100
    if "videos" in batch:
        logits = model(ids, videos=[v.to(dev) for v in batch["videos"]], select=select)
    elif "pixels" in batch:
        B = ids.shape[0]
        a = model.module.vision_encoder.args if hasattr(model, "module") else model.vision_encoder.args
        px = torch.zeros(B, 1, a.max_num_tiles, *batch["pixels"].shape[1:], device=dev)
        px[:, 0, 0] = batch["pixels"]
        ar_mask = torch.zeros(B, 1, a.max_num_tiles, dtype=torch.long, device=dev)
        ar_mask[:, :, 0] = 1
        image_token = getattr(model, "module", model).image_token_id
        from mm_llama.data.collate import cross_attention_mask

        xm = cross_attention_mask(ids.tolist(), image_token, [[1]] * B, a.max_num_tiles).to(dev)
        logits = model(ids, pixel_values=px, aspect_ratio_ids=torch.ones(B, 1, dtype=torch.long, device=dev),
                       aspect_ratio_mask=ar_mask, cross_attention_mask=xm, select=select)  # fmt: skip
    else:
        logits = model(ids, batch["features"], batch["feature_lengths"], select=select)
    targets = labels[:, 1:][select[:, :-1]]  # row-major, as logits[select]
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, int(targets.numel())


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e6
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lr_at(step: int, cfg: TrainConfig) -> float:
    w = cfg.optim.warmup_steps
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, cfg.steps - w)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> list[float]:
    import torch.distributed as dist
    from mm_llama.data.loader import StreamingLoader

    from mm_llama.engine import DistributedDataParallel, init_distributed
    from mm_llama.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
    from mm_llama.llama import Tokenizer

    info = init_distributed(device="cpu" if not torch.cuda.is_available() else None)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tower = build_tower(cfg)
    tower_dtype = {"auto": torch.bfloat16 if info.device.type == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]  # fmt: skip
    tower.to(dtype=tower_dtype)
    model = build_model(cfg, tower)
    model.to(info.device)
    if cfg.activation_checkpointing:
        _checkpoint_tower_layers(model.tower)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.engine == "ours":
        wrapped = DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
    elif cfg.engine == "torch" and info.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
    elif cfg.engine == "torch":
        wrapped = model
    else:
        raise ValueError(f"engine must be ours or torch, not {cfg.engine!r}")
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    loader = StreamingLoader(
        cfg.data.train, map_fn=SampleMaker(cfg, model, tok), collate_fn=collate, batch_size=cfg.data.batch_size,
        batches_per_epoch=10**9, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed, rank=info.rank, world_size=info.world_size, max_bad_fraction=cfg.data.max_bad_fraction,
        split=cfg.data.split,
    )  # fmt: skip
    step, losses, nonfinite = 0, [], 0
    ckpt = None
    if cfg.resume == "auto":
        ckpt = latest_checkpoint(run)
    elif cfg.resume not in ("none", ""):
        ckpt = Path(cfg.resume)
    if ckpt is not None:
        weights, state, data_state = load_checkpoint(ckpt, info.rank)
        model.load_state_dict(weights, strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loader.load_state_dict(data_state)
        step, losses, nonfinite = state["step"], list(state["losses"]), state["nonfinite"]
    barrier = dist.barrier if info.distributed else None
    metrics = (run / "metrics.jsonl").open("a") if info.is_main else None
    tb = None
    if info.is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    peak = cfg.peak_tflops or (989.0 if torch.cuda.is_available() else 0.1)
    prof = contextlib.nullcontext()
    if cfg.profile and info.is_main:
        from torch.profiler import profile, schedule, tensorboard_trace_handler

        prof = profile(schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(run / "profile")))  # fmt: skip
    prof = prof.__enter__()
    batches = iter(loader)
    bar = None
    if info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not sys.stderr.isatty())
    data_wait0 = loader.data_wait_s
    while step < cfg.steps:
        t0 = time.perf_counter()
        if info.rank == cfg.debug_kill_rank and step == cfg.debug_kill_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad(set_to_none=True)
        total_loss, total_tokens = 0.0, 0
        for micro in range(cfg.optim.grad_accum):
            batch = next(batches)
            last = micro == cfg.optim.grad_accum - 1
            ctx = wrapped.no_sync() if (not last and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
            amp = (  # bf16 towers (CUDA by default; dtype=bfloat16 on CPUs with bf16 units) run adapters in autocast
                torch.autocast(info.device.type, dtype=torch.bfloat16)
                if tower_dtype == torch.bfloat16
                else contextlib.nullcontext()
            )
            with ctx, amp:
                loss_sum, n_tok = forward_loss(wrapped, batch)
                n_glob = n_tok
                if info.distributed:  # normalise by the GLOBAL token count: the DDP average is then the global mean
                    t = torch.tensor([n_tok], device=info.device)
                    dist.all_reduce(t)
                    n_glob = int(t.item())
                (loss_sum * info.world_size / max(n_glob, 1) / cfg.optim.grad_accum).backward()
            total_loss += float(loss_sum.detach())
            total_tokens += n_tok
        sums = torch.tensor([total_loss, float(total_tokens)], dtype=torch.float64, device=info.device)
        if info.distributed:
            dist.all_reduce(sums)
        loss = float(sums[0] / max(sums[1], 1.0))
        if step in cfg.debug_nan_steps and nonfinite < len(cfg.debug_nan_steps):
            loss = float("nan")
        loss_t = torch.tensor([loss])
        if not math.isfinite(float(loss_t)):
            nonfinite += 1
            if info.is_main:
                print(f"step {step}: non-finite loss, step skipped ({nonfinite} so far)", file=sys.stderr)
            if nonfinite > cfg.optim.max_nonfinite:
                raise RuntimeError(f"{nonfinite} non-finite losses (last at step {step}): stopping; check lr/data")
            opt.zero_grad(set_to_none=True)
            continue
        gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip))
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss_t))
        dt = time.perf_counter() - t0
        if hasattr(prof, "step"):
            prof.step()
        if metrics is not None and step % cfg.log_every == 0:
            tps = total_tokens * info.world_size / dt
            wait = loader.data_wait_s - data_wait0
            data_wait0 = loader.data_wait_s
            rec = {"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                   "tokens_per_s": tps, "mfu": 6 * n_params * tps / (peak * 1e12 * info.world_size),
                   "data_wait_fraction": wait / dt, "nonfinite": nonfinite,
                   "peak_mem_mb": _peak_mem_mb()}  # fmt: skip
            rec.update(loader.metrics())
            if tb is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_fraction", "peak_mem_mb"):
                    tb.add_scalar(f"train/{k}", rec[k], step)
                tb.add_scalar("train/bad_samples", rec["bad_samples"], step)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            weights = {k: v for k, v in model.state_dict().items() if k in trainable_names}
            save_checkpoint(run, step, weights=weights, optimizer=opt, scheduler=sched,
                            extra={"losses": losses, "nonfinite": nonfinite}, data_states=loader.state_dict(),
                            rank=info.rank, is_main=info.is_main, keep=cfg.keep_last, barrier=barrier)  # fmt: skip
        if cfg.stop_after is not None and step >= cfg.stop_after:
            break
    if hasattr(prof, "__exit__"):
        prof.__exit__(None, None, None)
    if tb is not None:
        tb.close()
    if info.is_main:
        (run / "losses.json").write_text(json.dumps(losses))
        save_adapter_file(cfg, model, run / "adapter.safetensors")
        print("LOSSES " + json.dumps(losses), flush=True)
    return losses


def save_adapter_file(cfg: TrainConfig, model, path: Path) -> None:
    """The trained weights in the modality's adapter format (what `mm-llama caption/asr --adapter` and the video
    stage's `model.image_adapter` load)."""
    if cfg.model.modality == "image":
        from mm_llama.adapters.checkpoint import save_adapter

        save_adapter(model, path)
    elif cfg.model.modality == "speech":
        from mm_llama.adapters.asr import save_speech_adapter

        save_speech_adapter(model, path)
    else:
        from mm_llama.adapters.video import save_video_adapter

        save_video_adapter(model, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file (values only; defaults live in TrainConfig)")
    ap.add_argument("--profile", action="store_true", help="torch profiler trace of a few steps into RUN/profile/")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 engine=torch")
    args = ap.parse_intermixed_args(argv)
    from mm_llama.config import ConfigError

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides + (["profile=true"] if args.profile else []))
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    _exit_distributed()
    return 0


def _exit_distributed() -> None:
    import torch.distributed as dist

    from mm_llama.engine import exit_process

    if dist.is_available() and dist.is_initialized():
        exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
