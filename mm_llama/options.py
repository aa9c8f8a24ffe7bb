"""Command-line option checks: every numeric option of every `mm-llama` command is checked by argparse before any
work starts (a bad value exits 2 with one line naming the option and the range), from one table of ranges.

    p.add_argument("--top-p", type=RANGES["top_p"], default=1.0)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`PROG: error: ...`, exit 2); its subparsers are Parsers too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def ranged(
    kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], object]:
    """An argparse `type` reading `kind` and checking lo <= value <= hi (`*_open`: strict); None: unbounded."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be in {span}")
        return value

    parse.__name__ = f"{kind.__name__} in {span}"
    return parse


# the one table: every numeric option the commands share, by name
RANGES: dict[str, Callable[[str], object]] = {
    "max_new_tokens": ranged(int, 1),
    "temperature": ranged(float, 0.0),  # 0: greedy
    "top_p": ranged(float, 0.0, 1.0, lo_open=True),
    "top_k": ranged(int, 0),  # 0: off
    "frames": ranged(int, 1),
    "seed": ranged(int, 0),
    "timeout": ranged(float, 0.0, lo_open=True),
    "workers": ranged(int, 1),
    "max_upload_mb": ranged(float, 0.0, lo_open=True),
    "port": ranged(int, 0, 65535),  # 0: any free port
    "gpus": ranged(int, 1),
    "gpu_mem": ranged(float, 0.0, lo_open=True),
    "seq_len": ranged(int, 1),
    "count": ranged(int, 1),
    "size_mb": ranged(float, 0.0, lo_open=True),
}


def prog_error(prog: str, message: str) -> int:
    """One error line for a check that argparse cannot make (e.g. a file of a kind no adapter reads); returns 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
