"""The trainer: set-up built once (process group, model placement, engine, optimizer, schedule, data, resume), then
the loop (torchtitan's shape): batch iterator -> `train_step` (mm_llama/engine/step.py) -> checkpoints, metrics,
progress. It knows no modality: the caller gives it callables that build the model, make the data loader and save
the trained weights (recipes/train.py does, for every registered modality). Side concerns are context managers or
callbacks: the profiler (`profile`), fault injection for tests (a `Callback`).

`TrainerConfig` holds the run's keys of a training config (everything but the tower, model and data sections,
which belong to the recipe); YAML lists only what differs from these defaults.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mm_llama.config import ConfigError, save_config, to_dict
from mm_llama.llama.checkpoint import CheckpointError

from .checkpoint import DCP, load_checkpoint, save_checkpoint, set_rng_state
from .ddp import DistributedDataParallel
from .dist import DistInfo, init_distributed
from .flops import StepFlops, device_peak_flops
from .metrics import Metrics, Progress, peak_mem_mb, profiler
from .parallelize import param_groups, place, weight_dtype
from .resume import RunLock, choose_checkpoint
from .shard import (
    gather_full,
    is_sharded,
    load_full,
    load_optimizer_by_name,
    load_sharded_optimizer,
    optimizer_state_by_name,
    reshard_optimizer_state,
    save_sharded_optimizer,
)
from .step import StepResult, restore_schedule, train_step, warmup_cosine
from .train_config import (  # noqa: F401 - the config's classes, importable from here
    CkptConfig,
    EvalConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
    check_config,
    lower_is_better,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class Callback:
    """Hooks into the loop (tests inject faults with them): each may be overridden."""

    def on_step_start(self, trainer: Trainer, step: int) -> None: ...

    def on_loss(self, trainer: Trainer, step: int, loss: float) -> float:
        return loss

    def before_checkpoint_publish(self, trainer: Trainer, step: int) -> None: ...


def load_trained_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Trainable weights of a training checkpoint into the model built from the same config: every key must be one
    of the model's (a checkpoint of another modality or layout is an error, not a silent no-op)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = [k for k in weights if k not in params]
    if unexpected:
        raise CheckpointError(f"{source}: weights the model does not have: {unexpected[:5]} (another config?)")
    for k, v in weights.items():  # whole tensors; a sharded parameter takes its shard of it
        if tuple(v.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
        load_full(params[k], v)


class BatchLoader(Protocol):
    """What the trainer asks of its batch iterator (`mm_llama.data.loader.StreamingLoader` is one): batches, its
    counts, the seconds spent waiting for data, and cursors to resume from (the saved ranks' cursors load on any
    world size the loader can resume at)."""

    data_wait_s: float

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def metrics(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dicts(self, states: list[dict[str, Any]], source: str = ...) -> None: ...


MakeLoader = Callable[[nn.Module, DistInfo], BatchLoader]
Evaluator = Callable[[nn.Module, torch.dtype | None], dict[str, Any]]  # (model, autocast dtype) -> {eval_...: value}


class Trainer:
    """One training run, set up once. `build_model(dtype)`: the model with its tower's weights in `dtype` (on the
    CPU; the trainer places it); `make_loader(model, info)`: this rank's resumable batch iterator (a
    `data.loader.StreamingLoader`); `save_model(model, path)`: the trained weights as a file (called on every rank
    when adapter blocks are sharded). `config`: what is saved as RUN/config.yaml (default: `cfg`).
    `make_eval(info)` (with `eval.every`): a callable `(model, autocast_dtype) -> {eval_...: value}` that every rank
    calls every `eval.every` steps (recipes/train_eval.py). `after_place(model)`: runs once the model is placed
    (a tower built as a skeleton reads its shards there: towers loaded shard by shard)."""

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        build_model: Callable[[torch.dtype], nn.Module],
        make_loader: MakeLoader,
        save_model: Callable[[nn.Module, Path], None],
        config: DataclassInstance | None = None,
        callbacks: Sequence[Callback] = (),
        make_eval: Callable[[DistInfo], Evaluator] | None = None,
        after_place: Callable[[nn.Module], object] | None = None,
    ) -> None:
        check_config(cfg)
        self.make_eval, self.after_place = make_eval, after_place
        self.cfg, self.save_model, self.callbacks = cfg, save_model, list(callbacks)
        self.info = info = init_distributed(device="cpu" if not torch.cuda.is_available() else None)
        torch.manual_seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)
        self.config = to_dict(config or cfg)
        self.lock = RunLock(self.run_dir)
        ckpt = self._start()  # the folder locked and the resume decided before anything of the run is written
        try:
            self._set_up(build_model, make_loader, ckpt)
        except BaseException:
            self.lock.release(remove_created=True)  # a failed start leaves nothing behind
            raise
        if info.is_main:  # written once the run is set up
            name = "config.yaml" if ckpt is None else f"config.resume_{ckpt.name}.yaml"
            save_config(config or cfg, self.run_dir / name)

    def _start(self) -> Path | None:
        """Rank 0 takes the run folder and decides where the run starts; every rank gets the decision (or the
        same error)."""
        cfg, info = self.cfg, self.info
        outcome: list = [None, None]
        if info.is_main:
            try:
                self.lock.acquire()
                ckpt = choose_checkpoint(cfg.resume, self.run_dir, self.config, info.world_size, cfg.steps)
                outcome = [str(ckpt) if ckpt else None, None]
            except CheckpointError as e:
                self.lock.release(remove_created=True)
                outcome = [None, str(e)]
        if info.distributed:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise CheckpointError(outcome[1])
        return Path(outcome[0]) if outcome[0] else None

    def _set_up(
        self, build_model: Callable[[torch.dtype], nn.Module], make_loader: MakeLoader, ckpt: Path | None
    ) -> None:
        cfg, info = self.cfg, self.info
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.dtype = weight_dtype(cfg.dtype, info.device)
        self.amp = torch.bfloat16 if self.dtype == torch.bfloat16 else None  # bf16 towers run parts in autocast
        self.model = model = build_model(self.dtype)
        self.units = place(
            model, info, cfg.parallel, activation_checkpointing=cfg.activation_checkpointing, compute_dtype=self.amp
        )
        if self.after_place is not None:  # e.g. a tower built as a skeleton gets this rank's shards
            self.after_place(model)
        model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.wrapped = self._wrap(model)
        self.sharded = any(is_sharded(p) for p in self.trainable)
        opt = cfg.optim
        groups = param_groups(model, opt.lr, opt.encoder_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay)
        schedule = functools.partial(warmup_cosine, warmup=opt.warmup_steps, total=cfg.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.loader = make_loader(model, info)
        self.evaluate = self.make_eval(info) if cfg.eval.every and self.make_eval is not None else None
        self.step_count, self.losses, self.nonfinite = 0, [], 0
        self.best: dict | None = None  # {"value", "step"} of ckpt.keep_best so far
        if ckpt is not None:
            self._restore(ckpt)

    def _data_metrics(self) -> dict[str, Any]:
        """The loader's counts; a mixed run's per-source sample counts summed over all ranks (one small all-reduce,
        every rank calls it)."""
        out = self.loader.metrics()
        if "source_samples" in out and self.info.distributed:
            t = torch.tensor(out["source_samples"], dtype=torch.long, device=self.info.device)
            dist.all_reduce(t)
            out["source_samples"] = t.tolist()
        return out

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The data-parallel engine: ours (bucketed overlap) or torch's DDP (`engine=torch`, several processes)."""
        cfg, info = self.cfg, self.info
        # the aux objective leaves the parts that feed only the tower (e.g. token rows) without gradients; a mixed
        # run's batch may hold no media of a part
        unused = {"true": True, "false": False}.get(cfg.find_unused_parameters)
        if unused is None:
            unused = getattr(model, "aux_only", False) or getattr(model, "partial_batches", False)
        if cfg.engine == "ours":
            return DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb, find_unused_parameters=unused)
        if info.distributed:
            cap = None if cfg.bucket_cap_mb == "auto" else cfg.bucket_cap_mb  # torch's own default (25 MiB)
            return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap, find_unused_parameters=unused)
        return model

    def _restore(self, ckpt: Path) -> None:
        weights, state, data_states = load_checkpoint(ckpt, self.info.rank)
        load_trained_weights(self.model, weights, ckpt)
        opt = state["optimizer"]
        if opt == DCP:  # sharded adapters: read into this run's layout, any saved world size
            load_sharded_optimizer(self.model, self.optimizer, ckpt)
        elif all(isinstance(k, str) for k in opt["state"]):  # keyed by parameter name: any grouping
            load_optimizer_by_name(self.model, self.optimizer, opt)
        else:  # keyed by position (checkpoints written before): the same grouping
            self.optimizer.load_state_dict(opt)
            reshard_optimizer_state(self.optimizer)
        restore_schedule(self.scheduler, state["scheduler"])
        set_rng_state(state["rng"])
        try:  # the saved ranks' cursors: this rank's, or (the global stream) any world size's
            self.loader.load_state_dicts(data_states, source=str(ckpt))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.step_count, self.losses, self.nonfinite = state["step"], list(state["losses"]), state["nonfinite"]
        self.best = state.get("best")

    # --- the step and the loop -----------------------------------------------------------------
    def step(self, batches: Iterator[dict[str, Any]]) -> StepResult:
        """One optimizer step on the next `grad_accum` batches of the iterator `batches`."""
        cfg = self.cfg

        def hook(loss: float) -> float:
            for cb in self.callbacks:
                loss = cb.on_loss(self, self.step_count, loss)
            return loss

        return train_step(
            self.wrapped,
            self.optimizer,
            self.scheduler,
            batches,
            self.trainable,
            device=self.info.device,
            grad_accum=cfg.optim.grad_accum,
            clip=cfg.optim.clip,
            world_size=self.info.world_size,
            autocast_dtype=self.amp,
            loss_hook=hook,
        )

    def run(self) -> list[float]:
        """Train to `steps` (or `stop_after`), checkpointing and logging; save the trained weights; the losses. The
        run folder is given up at the end, however the run ends."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> list[float]:
        cfg, info = self.cfg, self.info
        metrics = Metrics(self.run_dir, info.is_main, cfg.tensorboard)
        peak, peak_source = device_peak_flops(info.device, self.amp or torch.float32, cfg.peak_tflops)
        if info.is_main:
            print(f"MFU peak: {peak / 1e12:.3g} TFLOP/s per device ({peak_source})", file=sys.stderr)
        batches = iter(self.loader)
        bar = Progress(cfg.steps, self.step_count, cfg.progress_every_s) if info.is_main else None
        wait0 = self.loader.data_wait_s
        with profiler(self.run_dir, cfg.profile and info.is_main) as prof_step:
            while self.step_count < cfg.steps:
                t0 = time.perf_counter()
                for cb in self.callbacks:
                    cb.on_step_start(self, self.step_count)
                count = StepFlops() if (self.step_count + 1) % cfg.log_every == 0 else None
                with count or contextlib.nullcontext():
                    res = self.step(batches)
                if res.skipped:
                    self._skipped()
                    continue
                self.step_count += 1
                self.losses.append(res.loss)
                dt = time.perf_counter() - t0
                prof_step()
                tps = res.tokens * info.world_size / dt
                due = self.evaluate is not None and (
                    self.step_count % cfg.eval.every == 0 or self.step_count == cfg.steps
                )
                held_out = self._evaluate() if due else {}
                if held_out and self.step_count % cfg.log_every:  # an evaluation is logged whatever log_every says
                    metrics.log({"step": self.step_count, "loss": res.loss, **held_out})
                if count is not None:  # a logging step: `(step_count + 1) % log_every == 0` before this step
                    wait, wait0 = self.loader.data_wait_s - wait0, self.loader.data_wait_s
                    rec = {
                        "step": self.step_count,
                        "loss": res.loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": res.grad_norm,
                        "tokens_per_s": tps,
                        "flops": count.total,
                        "mfu": count.total / (dt * peak),
                        "data_wait_fraction": wait / dt,
                        "nonfinite": self.nonfinite,
                        "peak_mem_mb": peak_mem_mb(),
                    }
                    metrics.log(rec | self._data_metrics() | held_out)
                if bar is not None:
                    bar.update(self.step_count, res.loss, tps)
                if self.step_count % cfg.ckpt_every == 0 or self.step_count == cfg.steps:
                    self.save_checkpoint()
                if cfg.stop_after is not None and self.step_count >= cfg.stop_after:
                    break
        metrics.close()
        if bar is not None:
            bar.close()
        if info.is_main:
            (self.run_dir / "losses.json").write_text(json.dumps(self.losses))
        if info.is_main or self.units:  # sharded adapter blocks are gathered whole for the file: every rank takes part
            self.save_model(self.model, self.run_dir / "adapter.safetensors")
        return self.losses

    def _evaluate(self) -> dict[str, Any]:
        """The held-out figures now (every rank), and the best adapter kept when `ckpt.keep_best` improved."""
        assert self.evaluate is not None  # called only when the run evaluates (`eval.every` and `make_eval`)
        self.model.eval()
        try:
            out = self.evaluate(self.model, self.amp)
        finally:
            self.model.train()
        metric, step = self.cfg.ckpt.keep_best, self.step_count
        if not metric:
            return out
        if metric not in out:
            have = ", ".join(sorted(k for k in out if k not in ("eval_samples", "eval_seconds")))
            raise ConfigError(f"ckpt.keep_best={metric}: this run's evaluation reports {have}")
        value = float(out[metric])
        better = self.best is None or (
            value < self.best["value"] if lower_is_better(metric) else value > self.best["value"]
        )
        if better:
            self.best = {"metric": metric, "value": value, "step": step}
            if self.info.is_main or self.units:
                self.save_model(self.model, self.run_dir / "adapter.best.safetensors")
            if self.info.is_main:
                (self.run_dir / "best.json").write_text(json.dumps(self.best) + "\n")
        return out

    def _skipped(self) -> None:
        self.nonfinite += 1
        if self.info.is_main:
            print(f"step {self.step_count}: non-finite loss, step skipped ({self.nonfinite} so far)", file=sys.stderr)
        if self.nonfinite > self.cfg.optim.max_nonfinite:
            raise RuntimeError(
                f"{self.nonfinite} non-finite losses (last at step {self.step_count}): stopping; check lr/data"
            )

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step (every rank takes part)."""
        info, step = self.info, self.step_count
        state = self.model.state_dict()
        weights = gather_full({k: v for k, v in state.items() if k in self.trainable_names}, keep=info.is_main)
        model, optimizer = self.model, self.optimizer
        opt_state = optimizer_state_by_name(model, optimizer) if info.is_main and not self.sharded else None

        def write_sharded(folder: Path) -> None:
            save_sharded_optimizer(model, optimizer, folder)

        def before_publish() -> None:
            for cb in self.callbacks:
                cb.before_checkpoint_publish(self, step)

        return save_checkpoint(
            self.run_dir,
            step,
            weights=weights,
            optimizer_state=opt_state,
            scheduler=self.scheduler,
            extra={"losses": self.losses, "nonfinite": self.nonfinite, "best": self.best},
            data_states=self.loader.state_dict(),
            rank=info.rank,
            is_main=info.is_main,
            keep=self.cfg.keep_last,
            barrier=dist.barrier if info.distributed else None,
            world_size=info.world_size,
            before_publish=before_publish,
            write_sharded=write_sharded if self.sharded else None,
            config=self.config,
        )
