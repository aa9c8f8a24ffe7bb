"""recipes/train.py with faults injected through the trainer's callbacks (robustness tests only; the production
config has no fault keys).

    python -m tests.fault_train [--nan-steps 2,3] [--kill-rank R --kill-step S [--kill-in step|save]] --config ...

--nan-steps: the loss of these steps reads as non-finite (each at most once); --kill-rank/--kill-step: SIGKILL that
rank at the start of that step, or (`--kill-in save`) while that step's checkpoint is being written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mm_llama.engine.trainer import Callback
from recipes.train import main as train_main


class Faults(Callback):
    def __init__(self, nan_steps: list[int], kill_rank: int, kill_step: int, kill_in: str):
        self.nan_steps, self.kill_rank, self.kill_step, self.kill_in = nan_steps, kill_rank, kill_step, kill_in

    def _kill(self, trainer, step: int, where: str) -> None:
        if trainer.info.rank == self.kill_rank and step == self.kill_step and where == self.kill_in:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_start(self, trainer, step: int) -> None:
        self._kill(trainer, step, "step")

    def on_loss(self, trainer, step: int, loss: float) -> float:
        if step in self.nan_steps and trainer.nonfinite < len(self.nan_steps):
            return float("nan")
        return loss

    def before_checkpoint_publish(self, trainer, step: int) -> None:
        self._kill(trainer, step, "save")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nan-steps", default="", help="comma-separated step numbers")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--kill-in", choices=["step", "save"], default="step")
    args, rest = ap.parse_known_args(argv)
    nan = [int(s) for s in args.nan_steps.split(",") if s]
    return train_main(rest, callbacks=[Faults(nan, args.kill_rank, args.kill_step, args.kill_in)])


if __name__ == "__main__":
    sys.exit(main())
