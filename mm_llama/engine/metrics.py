"""What a training run reports, on rank 0: metrics.jsonl (contract: one line per logged step with `step` and
`loss`) + TensorBoard, a live progress line, peak memory, and a torch profiler trace as a context manager."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import profile, schedule, tensorboard_trace_handler
from tqdm import tqdm

TB_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_fraction", "peak_mem_mb", "bad_samples")


class Metrics:
    """metrics.jsonl + TensorBoard (`tensorboard=True`), written by rank 0 only (`enabled`)."""

    def __init__(self, run: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.file = (run / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional, heavy (tensorboard)

            self.tb = SummaryWriter(str(run / "tensorboard"))

    def log(self, rec: dict) -> None:
        if self.file is None:
            return
        if self.tb is not None:
            for k in TB_KEYS:
                if k in rec:
                    self.tb.add_scalar(f"train/{k}", rec[k], rec["step"])
            for k, v in rec.items():  # held-out figures (eval_loss, eval_wer, ...)
                if k.startswith("eval_") and isinstance(v, int | float):
                    self.tb.add_scalar(f"eval/{k.removeprefix('eval_')}", v, rec["step"])
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


class Progress:
    """Live progress on rank 0: a tqdm bar in a terminal; otherwise (a log file, CI, the demo's capture) one line
    `[train] step S/N loss L tok/s T eta M:SS` every `every_s` seconds and at the last step."""

    def __init__(self, total: int, start: int, every_s: float) -> None:
        self.total, self.start, self.every_s = total, start, every_s
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
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
        eta = (now - self.t0) / max(step - self.start, 1) * (self.total - step)
        print(
            f"[train] step {step}/{self.total} loss {loss:.4f} tok/s {tokens_per_s:.0f} "
            f"eta {int(eta // 60)}:{int(eta % 60):02d}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_mem_mb() -> float:
    """The CUDA allocator's peak, or this process's peak resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def profiler(run: Path, enabled: bool) -> Iterator[Callable[[], object]]:
    """A torch profiler trace of steps 2-4 into RUN/profile/ (with a table of the ops by their own time over those
    steps in RUN/profile/ops.txt); yields a per-step callback (a no-op when not `enabled`)."""
    if not enabled:
        yield lambda: None
        return
    trace = tensorboard_trace_handler(str(run / "profile"))

    def ready(prof: profile) -> None:
        trace(prof)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (run / "profile" / "ops.txt").write_text(table)

    with profile(schedule=schedule(wait=1, warmup=1, active=3, repeat=1), on_trace_ready=ready) as prof:
        yield prof.step
