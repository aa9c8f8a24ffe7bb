"""The trainer's config: the run's keys of a training config (everything but the tower, model and data sections,
which belong to the recipe), with their defaults and ranges; YAML lists only what differs from these defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from mm_llama.config import ConfigError, auto_or_bounded, bounded, choice


@dataclass
class OptimConfig:
    lr: float = bounded(1e-3, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    warmup_steps: int = bounded(2, 0)
    grad_accum: int = bounded(1, 1)
    clip: float = bounded(1.0, 0.0)
    max_nonfinite: int = bounded(5, 0)
    # learning-rate multiplier for media encoders' weights (the image part's `vision_encoder`, a speech part's
    # `encoder`): a pretrained encoder fine-tuned beside fresh adapters wants a fraction of their rate (Llama 3
    # updates the image encoder during adapter training; only the language model stays frozen)
    encoder_lr_scale: float = bounded(1.0, 0.0)


@dataclass
class ParallelConfig:
    # replicate: every rank holds the whole frozen tower; fsdp: FSDP2 shards it per transformer block
    tower: str = choice("replicate", "replicate", "fsdp")
    # flat: shard over all ranks; hybrid: shard within a machine (LOCAL_WORLD_SIZE ranks), replicate across machines
    mesh: str = choice("flat", "flat", "hybrid")
    # replicate: the adapters on our DDP engine; fsdp: their large blocks (cross-attention blocks, encoder layers)
    # sharded by FSDP2 too (needs tower=fsdp), the rest on our engine
    adapters: str = choice("replicate", "replicate", "fsdp")


@dataclass
class EvalConfig:
    every: int = bounded(0, 0)  # > 0: held-out figures every N steps and at the last (eval_loss + the plug-ins')
    data: str = ""  # the held-out samples: an index.json or shards
    samples: int = bounded(64, 1)  # the first K samples of `data`, split over the ranks
    batch_size: int = bounded(8, 1)
    max_new_tokens: int = bounded(32, 1)


@dataclass
class CkptConfig:
    # an evaluation figure (eval_loss, eval_wer, eval_cider, ...): the best adapter so far is kept beside the last,
    # as RUN/adapter.best.safetensors with RUN/best.json (lower is better for losses and error rates)
    keep_best: str = ""


@dataclass
class TrainerConfig:
    run_dir: str = "runs/debug"
    steps: int = bounded(10, 1)
    seed: int = 0
    engine: str = choice("ours", "ours", "torch")
    # a step whose batch leaves some trainable part without media (mixed runs, text-only samples) has parameters
    # with no gradient: the engine must look for them (a graph walk + one small all-reduce per step). auto: on when
    # the model says batches may leave parts out (several trained parts or sources) or the objective is aux
    find_unused_parameters: str = choice("auto", "auto", "true", "false")
    bucket_cap_mb: float | str = auto_or_bounded("auto", 0.0)  # auto: sized from the trainable gradients
    log_every: int = bounded(1, 1)
    ckpt_every: int = bounded(5, 1)
    keep_last: int = bounded(3, 1)
    resume: str = "auto"  # auto | none | a checkpoint folder
    dtype: str = choice("auto", "auto", "float32", "bfloat16")  # tower: auto = bfloat16 on CUDA, float32 on CPU
    activation_checkpointing: bool = False  # recompute tower layers and adapter blocks in backward
    stop_after: int | None = bounded(None, 1)  # stop (as if killed) after this many steps: resume tests
    profile: bool = False  # torch profiler trace of steps 2-4 into RUN/profile/
    tensorboard: bool = True
    progress_every_s: float = bounded(30.0, 0.0)  # without a terminal: a progress line this often (rank 0)
    peak_tflops: float | None = bounded(None, 0.0)  # MFU peak per device; default: spec sheet (GPU), measured (CPU)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)


def check_config(cfg: TrainerConfig) -> None:
    """What the single keys' checks cannot see: combinations (a ConfigError names them)."""
    if cfg.parallel.adapters == "fsdp" and cfg.parallel.tower != "fsdp":
        raise ConfigError("parallel.adapters=fsdp needs parallel.tower=fsdp (the adapters shard on the tower's mesh)")
    if cfg.parallel.tower == "fsdp" and cfg.engine != "ours":
        raise ConfigError("parallel.tower=fsdp needs engine=ours (torch's DDP would broadcast the sharded tower)")
    if cfg.ckpt.keep_best and (not cfg.eval.every or not cfg.ckpt.keep_best.startswith("eval_")):
        raise ConfigError(
            f"ckpt.keep_best={cfg.ckpt.keep_best}: name an evaluation figure (eval_loss, eval_wer, eval_cider, ...) "
            "of a run with eval.every > 0"
        )


def lower_is_better(metric: str) -> bool:
    return any(w in metric for w in ("loss", "wer", "cer"))
