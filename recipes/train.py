"""ONE training recipe for every modality (image, video, speech: a plug-in each, adapters/registry.py) on a
frozen Llama 3 tower.

    python -m recipes.train --config recipes/configs/debug_image.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m recipes.train --config ... engine=ours
    accelerate launch --multi_gpu --num_processes 2 -m recipes.train --config ...

The step (mm_llama/engine/step.py): batch iterator (webdataset stream, resumable) -> forward_backward
(micro-batches, no_sync for accumulation, loss normalised by the global token count) -> train_step (clip, AdamW
step, warmup + cosine schedule; non-finite losses skipped and counted) -> train (below: checkpoints, metrics JSONL,
progress, profiling; fault injection for tests). The model is an `mm_llama.adapters.composed.ComposedModel` with
the trained modality's part; `model(**batch, labels=labels).loss`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import torch

from mm_llama.assets import resolve
from mm_llama.config import auto_or_bounded, bounded, choice, load_config, save_config


@dataclass
class TowerCfg:
    path: str | None = None  # Meta dir | HF dir (an Mllama one: its text model) | .gguf; None: a random preset
    preset: str = "debug"
    vocab_size: int | None = None  # random preset: match the tokenizer's vocabulary
    seed: int = 0


def _model_cfg():
    """`model:` = the modality to train, the tokenizer, and one section per registered modality (its plug-in's
    Config), so a new plug-in brings its options with it."""
    from mm_llama.adapters.registry import MODALITIES

    fields = [("modality", str, choice("image", *MODALITIES)), ("tokenizer", str, "")]
    fields += [(name, spec.part.Config, field(default_factory=spec.part.Config)) for name, spec in MODALITIES.items()]
    return make_dataclass("ModelCfg", fields)


ModelCfg = _model_cfg()


@dataclass
class DataCfg:
    train: str = ""
    batch_size: int = bounded(2, 1)
    num_workers: int = bounded(0, 0)
    shuffle_buffer: int = bounded(16, 1)
    max_bad_fraction: float = bounded(0.01, 0.0, 1.0)
    prompt: str = ""
    max_text_tokens: int = bounded(64, 1)
    split: str = choice(
        "shards", "shards", "interleave", "none"
    )  # shards | interleave (N ranks x B/N == 1 rank x B, for checks) | none (same stream)


@dataclass
class OptimCfg:
    lr: float = bounded(1e-3, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    warmup_steps: int = bounded(2, 0)
    grad_accum: int = bounded(1, 1)
    clip: float = bounded(1.0, 0.0)
    max_nonfinite: int = bounded(5, 0)
    # learning-rate multiplier for a trained media encoder's weights (`vision_encoder.*`, a speech part's
    # `encoder.*`): a pretrained encoder fine-tuned beside fresh adapters wants a fraction of their rate (Llama 3
    # updates the image encoder during adapter training; only the language model stays frozen)
    encoder_lr_scale: float = bounded(1.0, 0.0)


ENCODER_MODULES = frozenset({"vision_encoder", "encoder"})


def param_groups(model: torch.nn.Module, optim: OptimCfg) -> list[dict]:
    """The trainable parameters as AdamW groups: FSDP2-sharded ones (DTensors) apart from plain ones (the fused /
    foreach kernels take one kind at a time), and a media encoder's weights at `optim.encoder_lr_scale` x the rate
    (LambdaLR scales each group's own rate, so the ratio holds through warm-up and decay)."""
    from mm_llama.engine.shard import is_sharded

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            enc = optim.encoder_lr_scale != 1.0 and not ENCODER_MODULES.isdisjoint(name.split("."))
            groups.setdefault((is_sharded(p), enc), []).append(p)
    return [{"params": ps, "lr": optim.lr * (optim.encoder_lr_scale if enc else 1.0)}
            for (_, enc), ps in sorted(groups.items())]  # fmt: skip


@dataclass
class ParallelCfg:
    # replicate: every rank holds the whole frozen tower; fsdp: FSDP2 shards it per transformer block
    # (mm_llama/engine/shard.py), the adapters stay replicated on our engine
    tower: str = choice("replicate", "replicate", "fsdp")
    # flat: shard over all ranks; hybrid: shard within a machine (LOCAL_WORLD_SIZE ranks), replicate across machines
    mesh: str = choice("flat", "flat", "hybrid")
    # replicate: the adapters on our DDP engine; fsdp: their large blocks (the plug-in's `shard_units`: cross-
    # attention blocks, encoder layers) sharded by FSDP2 too (needs tower=fsdp), the rest on our engine
    adapters: str = choice("replicate", "replicate", "fsdp")


@dataclass
class TrainConfig:
    run_dir: str = "runs/debug"
    steps: int = bounded(10, 1)
    seed: int = 0
    engine: str = choice("ours", "ours", "torch")
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
    init_adapter: str = ""  # start the trainable weights from this adapter file (same modality and options)
    # lm: the token loss through the frozen tower (+ the plug-in's auxiliary losses); aux: the auxiliary losses only,
    # the tower skipped (e.g. a cheap CTC phase for the speech adapter before the LM phase)
    objective: str = choice("lm", "lm", "aux")
    debug_nan_steps: list = field(default_factory=list)  # inject non-finite losses at these steps (tests)
    debug_kill_rank: int = -1  # SIGKILL this rank at debug_kill_step (robustness tests)
    debug_kill_step: int = -1
    debug_kill_in: str = choice("step", "step", "save")  # kill at the step's start, or inside its checkpoint save
    tower: TowerCfg = field(default_factory=TowerCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)


# ----------------------------------------------------------------------------------------------
# building


def tower_dtype(cfg: TrainConfig, device) -> torch.dtype:
    """The frozen tower's weight dtype for `cfg.dtype` on `device` (a torch.device or its type name): auto is
    bfloat16 on CUDA and float32 elsewhere. Training and evaluation both use it, so an adapter is evaluated on the
    tower it was trained with (bf16 weights under bf16 autocast where it trained that way)."""
    kind = device if isinstance(device, str) else device.type
    if cfg.dtype == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def build_tower(cfg: TrainConfig):
    from mm_llama.llama import Transformer, get_preset, load_pretrained

    if cfg.tower.path:
        from mm_llama.adapters.hf_mllama import is_mllama_folder, load_hf_mllama

        path = resolve(cfg.tower.path)
        if is_mllama_folder(path):  # Llama 3.2 Vision: its text model (model.image.release: its adapter)
            return load_hf_mllama(Path(path), text_only=True)
        return load_pretrained(path)
    args = get_preset(cfg.tower.preset)
    if cfg.tower.vocab_size:
        args = args.replace(vocab_size=cfg.tower.vocab_size)
    tower = Transformer(args)
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(cfg.tower.seed))
    return tower.requires_grad_(False).eval()


def build_model(cfg: TrainConfig, tower):
    """The tower + a fresh part of the configured modality, built by its plug-in, on the frozen parts it requires
    (each a module or an adapter file)."""
    from mm_llama.adapters.composed import ComposedModel
    from mm_llama.adapters.files import load_part
    from mm_llama.adapters.registry import get_modality

    spec = get_modality(cfg.model.modality)
    parts = {}
    for kind, base in spec.part.base_parts(tower, cfg.model).items():
        part = load_part(tower, base, parts)[1] if isinstance(base, (str, Path)) else base
        parts[kind] = part.requires_grad_(False)
    parts[spec.name] = spec.part.build(tower, cfg.model, parts)
    return ComposedModel(tower, parts)


def Collate(modality: str):  # noqa: N802 - the batch function of a run
    """Sample-maker items -> a batch (picklable): the model's modalities' inputs."""
    from mm_llama.adapters.generation import Collate as C
    from mm_llama.adapters.registry import get_modality

    return C([*get_modality(modality).requires, modality])


def init_from_adapter(model, kind: str, path) -> None:
    """`init_adapter=`: the part's weights from an adapter file of the same modality and options."""
    from mm_llama.adapters.files import init_part_from_file
    from mm_llama.config import ConfigError
    from mm_llama.llama.checkpoint import CheckpointError

    try:
        init_part_from_file(model, kind, path)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"init_adapter: {e} (use a file from a run with the same model.{kind} options)") from None


def load_trained_weights(model, weights: dict, source) -> None:
    """Trainable weights of a training checkpoint into the model built from the same config: every key must be
    one of the model's (a checkpoint of another modality or layout is an error, not a silent no-op)."""
    from mm_llama.engine.shard import load_full
    from mm_llama.llama.checkpoint import CheckpointError

    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = [k for k in weights if k not in params]
    if unexpected:
        raise CheckpointError(f"{source}: weights the model does not have: {unexpected[:5]} (another config?)")
    for k, v in weights.items():  # whole tensors; a sharded parameter takes its shard of it
        if tuple(v.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
        load_full(params[k], v)


def adapter_blocks(model) -> list:
    """The large repeated blocks of every part (`ComposedModel.shard_units`)."""
    return model.shard_units()


def checkpoint_activations(model) -> None:
    """`activation_checkpointing`: recompute in backward, instead of storing their activations, each frozen tower
    layer and each adapter block (`adapter_blocks`); each keeps only its inputs."""
    from torch.utils.checkpoint import checkpoint

    for block in [*model.tower.layers, *adapter_blocks(model)]:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def shard_tower(model, info, mesh_layout: str, adapters: bool = False, compute_dtype=None) -> list:
    """`parallel.tower=fsdp`: the frozen tower's blocks, embeddings and output projection become FSDP2 units on the
    device (the final norm in the root unit); with `adapters` (`parallel.adapters=fsdp`) each plug-in's
    `shard_units` too. Every other adapter weight stays a replicated tensor for our engine. Returns the sharded
    adapter units."""
    from mm_llama.engine.shard import device_mesh, resident_bytes, shard_frozen

    tower_params = set(model.tower.parameters())
    units = adapter_blocks(model) if adapters else []
    leave = {p for p in model.parameters() if p not in tower_params}
    tower_modules = set(model.tower.modules())
    for mod in model.modules():  # the adapters to the device; the tower moves there shard by shard
        if mod not in tower_modules:
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is not None:
                    t.data = t.data.to(info.device)
    mesh = device_mesh(info.device, info.world_size, info.local_world_size, mesh_layout)
    tower = model.tower
    ends = [[tower.tok_embeddings, tower.output]] if tower.args.tie_embeddings else [tower.tok_embeddings, tower.output]
    shard_frozen(model, [*tower.layers, *ends], mesh, leave=leave, trained_units=units, compute_dtype=compute_dtype)
    model.tower.reset_buffers()
    res = resident_bytes(model.tower)
    if info.is_main:
        print(f"parallel.tower=fsdp: tower weights {res.local / 1e6:.1f} MB of {res.full / 1e6:.1f} MB on this rank "
              f"({res.fraction:.3f}; mesh {mesh_layout} {tuple(mesh.shape)})", file=sys.stderr, flush=True)  # fmt: skip
        if units:
            local = sum(resident_bytes(u).local for u in units)
            full = sum(resident_bytes(u).full for u in units)
            print(f"parallel.adapters=fsdp: {len(units)} adapter units, {local / 1e6:.1f} MB of {full / 1e6:.1f} MB "
                  "on this rank", file=sys.stderr, flush=True)  # fmt: skip
    return units


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e6
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _profiler(cfg: TrainConfig, run: Path, enabled: bool):
    """torch profiler trace of steps 2-4 into RUN/profile/ (`profile=true`), with a table of the ops by their own
    time over those steps in RUN/profile/ops.txt; yields a per-step callback."""
    if not (cfg.profile and enabled):
        yield lambda: None
        return
    from torch.profiler import profile, schedule, tensorboard_trace_handler

    trace = tensorboard_trace_handler(str(run / "profile"))

    def ready(prof):
        trace(prof)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (run / "profile" / "ops.txt").write_text(table)

    with profile(schedule=schedule(wait=1, warmup=1, active=3, repeat=1), on_trace_ready=ready) as prof:
        yield prof.step


class Metrics:
    """metrics.jsonl (contract: one line per logged step with `step` and `loss`) + TensorBoard, rank 0 only."""

    def __init__(self, run: Path, cfg: TrainConfig, enabled: bool):
        self.file = (run / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))

    def log(self, rec: dict) -> None:
        if self.file is None:
            return
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_fraction", "peak_mem_mb"):
                self.tb.add_scalar(f"train/{k}", rec[k], rec["step"])
            self.tb.add_scalar("train/bad_samples", rec["bad_samples"], rec["step"])
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def choose_checkpoint(cfg: TrainConfig, run: Path, world_size: int, is_main: bool) -> Path | None:
    """The checkpoint to resume from: `resume=auto` -> the newest that verifies (the skipped ones are named),
    `none` -> none, a path -> that one, which must verify (CheckpointError otherwise)."""
    from mm_llama.engine.checkpoint import find_resumable, verify_checkpoint
    from mm_llama.llama.checkpoint import CheckpointError

    if cfg.resume in ("none", ""):
        return None
    if cfg.resume != "auto":
        problem = verify_checkpoint(cfg.resume, world_size)
        if problem:
            raise CheckpointError(f"resume={cfg.resume}: {problem}")
        return Path(cfg.resume)
    ckpt, skipped = find_resumable(run, world_size)
    if is_main:
        for why in skipped:
            print(f"resume: skipped {why}", file=sys.stderr, flush=True)
        if ckpt is not None:
            print(f"resume: from {ckpt}", file=sys.stderr, flush=True)
        elif skipped:
            print("resume: no intact checkpoint; starting from step 0", file=sys.stderr, flush=True)
    return ckpt


class Progress:
    """Live progress on rank 0: a tqdm bar in a terminal; otherwise (a log file, CI, the demo's capture) one line
    `[train] step S/N loss L tok/s T eta M:SS` every `every_s` seconds and at the last step."""

    def __init__(self, total: int, start: int, every_s: float):
        self.total, self.start, self.every_s = total, start, every_s
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            return
        now = time.perf_counter()
        if now - self.last < self.every_s and step != self.total:
            return
        self.last = now
        done = step - self.start
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        print(f"[train] step {step}/{self.total} loss {loss:.4f} tok/s {tokens_per_s:.0f} "
              f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _kill_if_asked(cfg: TrainConfig, rank: int, step: int, where: str = "step") -> None:
    """Fault injection for robustness tests: SIGKILL this rank at the configured step (at its start, or while
    its checkpoint is being saved: `debug_kill_in=save`)."""
    if rank == cfg.debug_kill_rank and step == cfg.debug_kill_step and where == cfg.debug_kill_in:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig) -> list[float]:
    import torch.distributed as dist

    from mm_llama.adapters.registry import get_modality
    from mm_llama.data.loader import StreamingLoader
    from mm_llama.engine import DistributedDataParallel, init_distributed
    from mm_llama.engine.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
    from mm_llama.engine.flops import StepFlops, device_peak_flops
    from mm_llama.engine.shard import gather_full, is_sharded, local_optimizer_state, reshard_optimizer_state
    from mm_llama.engine.step import train_step, warmup_cosine
    from mm_llama.llama import Tokenizer

    info = init_distributed(device="cpu" if not torch.cuda.is_available() else None)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    ckpt = choose_checkpoint(cfg, run, info.world_size, info.is_main)  # before anything of the run is written
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / ("config.yaml" if ckpt is None else f"config.resume_{ckpt.name}.yaml"))
    spec = get_modality(cfg.model.modality)
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tower = build_tower(cfg)
    tower_dt = tower_dtype(cfg, info.device)
    tower.to(dtype=tower_dt)
    model = build_model(cfg, tower)
    if cfg.init_adapter:
        init_from_adapter(model, spec.name, resolve(cfg.init_adapter))
    model.aux_only = cfg.objective == "aux"
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    units = []
    if cfg.parallel.tower == "fsdp" and info.distributed:
        amp = torch.bfloat16 if tower_dt == torch.bfloat16 else None  # bf16 tower: adapter blocks gathered in bf16
        units = shard_tower(model, info, cfg.parallel.mesh, adapters=cfg.parallel.adapters == "fsdp",
                            compute_dtype=amp)  # fmt: skip
    else:
        if cfg.parallel.tower == "fsdp" and info.is_main:
            print("parallel.tower=fsdp: one process, nothing to shard (the tower stays whole)", file=sys.stderr)
        model.to(info.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.engine == "ours":
        # the aux objective leaves the parts that feed only the tower (e.g. token rows) without gradients
        wrapped = DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb,
                                          find_unused_parameters=model.aux_only)  # fmt: skip
    elif cfg.engine == "torch" and info.distributed:
        cap = None if cfg.bucket_cap_mb == "auto" else cfg.bucket_cap_mb  # torch's own default (25 MiB)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap,
                                                            find_unused_parameters=model.aux_only)  # fmt: skip
    elif cfg.engine == "torch":
        wrapped = model
    else:
        raise ValueError(f"engine must be ours or torch, not {cfg.engine!r}")
    sharded = any(is_sharded(p) for p in trainable)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, cfg.steps))
    loader = StreamingLoader(
        cfg.data.train, map_fn=spec.data.samples(model, tok, cfg), collate_fn=Collate(spec.name),
        batch_size=cfg.data.batch_size, batches_per_epoch=10**9, num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
        max_bad_fraction=cfg.data.max_bad_fraction, split=cfg.data.split,
    )  # fmt: skip
    step, losses, nonfinite = 0, [], 0
    if ckpt is not None:
        weights, state, data_state = load_checkpoint(ckpt, info.rank)
        load_trained_weights(model, weights, ckpt)
        opt.load_state_dict(state["optimizer"])
        reshard_optimizer_state(opt)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loader.load_state_dict(data_state)
        step, losses, nonfinite = state["step"], list(state["losses"]), state["nonfinite"]
    barrier = dist.barrier if info.distributed else None
    metrics = Metrics(run, cfg, info.is_main)
    amp_dtype = torch.bfloat16 if tower_dt == torch.bfloat16 else None  # bf16 towers run adapters in autocast
    # MFU: FLOPs executed on this rank (counted on logged steps) over one device's peak
    peak, peak_source = device_peak_flops(info.device, amp_dtype or torch.float32, cfg.peak_tflops)
    if info.is_main:
        print(f"MFU peak: {peak / 1e12:.3g} TFLOP/s per device ({peak_source})", file=sys.stderr)
    batches = iter(loader)
    bar = Progress(cfg.steps, step, cfg.progress_every_s) if info.is_main else None
    data_wait0 = loader.data_wait_s

    def inject_nan(loss: float) -> float:  # fault injection for tests (`debug_nan_steps`)
        return float("nan") if step in cfg.debug_nan_steps and nonfinite < len(cfg.debug_nan_steps) else loss

    with _profiler(cfg, run, info.is_main) as prof_step:
        while step < cfg.steps:
            t0 = time.perf_counter()
            _kill_if_asked(cfg, info.rank, step)
            count = StepFlops() if (step + 1) % cfg.log_every == 0 else contextlib.nullcontext()
            with count:
                res = train_step(wrapped, opt, sched, batches, trainable, device=info.device,
                                 grad_accum=cfg.optim.grad_accum, clip=cfg.optim.clip, world_size=info.world_size,
                                 autocast_dtype=amp_dtype, loss_hook=inject_nan)  # fmt: skip
            if res.skipped:
                nonfinite += 1
                if info.is_main:
                    print(f"step {step}: non-finite loss, step skipped ({nonfinite} so far)", file=sys.stderr)
                if nonfinite > cfg.optim.max_nonfinite:
                    raise RuntimeError(f"{nonfinite} non-finite losses (last at step {step}): stopping; check lr/data")
                continue
            step += 1
            losses.append(res.loss)
            dt = time.perf_counter() - t0
            prof_step()
            if step % cfg.log_every == 0:
                tps = res.tokens * info.world_size / dt
                wait = loader.data_wait_s - data_wait0
                data_wait0 = loader.data_wait_s
                rec = {"step": step, "loss": res.loss, "lr": sched.get_last_lr()[0], "grad_norm": res.grad_norm,
                       "tokens_per_s": tps, "flops": count.total, "mfu": count.total / (dt * peak),
                       "data_wait_fraction": wait / dt, "nonfinite": nonfinite,
                       "peak_mem_mb": _peak_mem_mb()}  # fmt: skip
                metrics.log(rec | loader.metrics())
            if bar is not None:
                bar.update(step, res.loss, res.tokens * info.world_size / dt)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                weights = gather_full({k: v for k, v in model.state_dict().items() if k in trainable_names},
                                      keep=info.is_main)  # fmt: skip
                opt_shard = local_optimizer_state(opt.state_dict()) if sharded else None
                kill = functools.partial(_kill_if_asked, cfg, info.rank, step, "save")
                save_checkpoint(run, step, weights=weights, optimizer=opt, scheduler=sched,
                                extra={"losses": losses, "nonfinite": nonfinite}, data_states=loader.state_dict(),
                                rank=info.rank, is_main=info.is_main, keep=cfg.keep_last, barrier=barrier,
                                world_size=info.world_size, before_publish=kill,
                                optimizer_shard=opt_shard)  # fmt: skip
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break
    metrics.close()
    if bar is not None:
        bar.close()
    if info.is_main:
        (run / "losses.json").write_text(json.dumps(losses))
    if info.is_main or units:  # sharded adapter blocks are gathered whole for the file: every rank takes part
        from mm_llama.adapters.files import save_part

        save_part(model, spec.name, run / "adapter.safetensors")
    if info.is_main:
        print("LOSSES " + json.dumps(losses), flush=True)
    return losses


def check_config(cfg: TrainConfig) -> None:
    """What the single keys' checks cannot see: combinations (a ConfigError names them)."""
    from mm_llama.config import ConfigError

    if cfg.parallel.adapters == "fsdp" and cfg.parallel.tower != "fsdp":
        raise ConfigError("parallel.adapters=fsdp needs parallel.tower=fsdp (the adapters shard on the tower's mesh)")
    if cfg.parallel.tower == "fsdp" and cfg.engine != "ours":
        raise ConfigError("parallel.tower=fsdp needs engine=ours (torch's DDP would broadcast the sharded tower)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file (values only; defaults live in TrainConfig)")
    ap.add_argument("--profile", action="store_true", help="torch profiler trace of a few steps into RUN/profile/")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 engine=torch")
    args = ap.parse_intermixed_args(argv)
    from mm_llama.config import ConfigError

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides + (["profile=true"] if args.profile else []))
        check_config(cfg)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    from mm_llama.llama.checkpoint import CheckpointError

    try:
        train(cfg)
    except CheckpointError as e:
        print(f"train.py: checkpoint error: {e}", file=sys.stderr)
        _exit_distributed(2)
        return 2
    except ConfigError as e:  # found while building (e.g. init_adapter= names a file of another layout)
        print(f"train.py: config error: {e}", file=sys.stderr)
        _exit_distributed(2)
        return 2
    _exit_distributed()
    return 0


def _exit_distributed(code: int = 0) -> None:
    import torch.distributed as dist

    from mm_llama.engine import exit_process

    if dist.is_available() and dist.is_initialized():
        exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
