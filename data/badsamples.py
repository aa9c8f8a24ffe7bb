"""Counting, logging and limiting bad samples: nothing crashes training, nothing is silently lost.

Every skipped sample is counted under a reason ("decode_image", "missing_field", "truncated_tar", ...), logged at a
bounded rate, and exposed as metrics. Once at least `min_samples` have been seen, a bad fraction above
`max_bad_fraction` raises `DataError` naming the shards and keys involved.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("mm_llama.data")


class DataError(RuntimeError):
    """Too many bad samples (or an unusable data source); the message names shards and keys."""


class SampleError(ValueError):
    """One sample cannot be used; `reason` is the metric bucket it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class BadSampleTracker:
    max_bad_fraction: float = 0.01
    min_samples: int = 200
    log_interval_s: float = 10.0
    seen: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # (reason, shard, key, message), first few only
    _last_log: float = 0.0
    _suppressed: int = 0

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, reason: str, shard: str, key: str | None, message: str) -> None:
        self.seen += 1
        self.bad += 1
        self.reasons[reason] += 1
        if len(self.examples) < 20:
            self.examples.append((reason, shard, key, message))
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            extra = f" (+{self._suppressed} more since last message)" if self._suppressed else ""
            log.warning("skipped bad sample %s in %s: %s: %s%s", key, shard, reason, message, extra)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1
        self.check()

    def check(self) -> None:
        if self.seen >= self.min_samples and self.bad > self.max_bad_fraction * self.seen:
            shown = "; ".join(f"{r} in {s} key {k}: {m}" for r, s, k, m in self.examples[:5])
            raise DataError(
                f"{self.bad} of {self.seen} samples were bad ({100 * self.bad / self.seen:.1f}% > "
                f"{100 * self.max_bad_fraction:.1f}% allowed); reasons {dict(self.reasons)}; first: {shown}"
            )

    def metrics(self) -> dict:
        return {"samples_seen": self.seen, "bad_samples": self.bad, "bad_reasons": dict(self.reasons)}

    def merge(self, seen: int, bad: int, reasons: dict) -> None:
        self.seen += seen
        self.bad += bad
        self.reasons.update(reasons)
