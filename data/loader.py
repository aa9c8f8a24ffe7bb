"""Streaming training loader over webdataset shards, split across ranks and DataLoader workers, exactly resumable.

Stream. Worker `g` of `G = world_size * num_workers` (g = rank * num_workers + worker) reads, for data-epoch
e = 0, 1, 2, ..., the shards `perm_e[g::G]` where `perm_e` is the shard list shuffled with seed (seed, e). With
fewer shards than workers every worker reads every shard and keeps sample i of shard position p when
(p + i) mod G == g.
Either way each sample appears exactly once per data-epoch across all ranks and workers. Streams never end: a
worker moves on to the next data-epoch, so the trainer sees a fixed number of batches per rank per epoch
(`batches_per_epoch`) and ranks never disagree on the number of steps (no DDP hang on uneven shards).

Shuffle buffer. Raw (undecoded) samples go through a buffer of `shuffle_buffer` slots: once full, each new sample
replaces a uniformly drawn slot whose content is emitted. Emitted samples are decoded/transformed by `map_fn` in
the worker (bad ones counted and skipped), collated by `collate_fn` into batches of `batch_size`.

Length bucketing (optional): a worker draws `bucket_batches` batches' worth of items, sorts them by `length_fn`,
cuts them into batches and shuffles the batch order.

Cursor. Every batch travels with its worker's state at the start of its batch group: data-epoch, shard position,
sample offset in that shard, the ids (epoch, shard position, index) of the samples sitting in the shuffle buffer,
the shuffle RNG state, and how many batches of the group were already handed out (`map_fn` must be
deterministic for the regenerated group to be identical). The main process keeps the state of each worker's
last CONSUMED batch. DataLoader hands out batches round-robin (batch c comes from worker c mod W), so after
restoring, physical worker w takes the role of logical worker (w + consumed) mod W, and the stream continues
exactly where it stopped: N batches == k batches + state_dict/load_state_dict + N-k batches. Restoring re-reads
only the shards that hold the buffered samples.

Global stream (`split="interleave"`). One sequence of samples defined by the seed alone: every rank and worker reads
all the shards through the same shuffle buffer, and the stream is cut into rounds of `batch_size * world_size`
samples; round c is the c-th batch of every rank (rank r keeps the samples r, r + world_size, ... of it) and is
decoded by worker c mod num_workers. So step t of a run with global batch B = batch_size x world_size x grad_accum
always trains on samples [t*B, (t+1)*B) of the one stream, whatever the world size, batch size, accumulation or
worker count: a checkpoint's cursor (the stream's state at a round boundary, the same on every rank) resumes on any
of them (elastic resume). The price: every rank reads every shard's bytes (decoding only its share), so at scale
`split="shards"` reads less and resumes on its own world size only. A bad sample leaves its rank's batch one short
(the rounds stay aligned); a share that is entirely bad takes the worker's next round as well.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from .badsamples import BadSampleTracker
from .shards import expand_urls, read_index
from .stream import ShardStream, _as_list, _source_cursors

__all__ = ["ShardStream", "StreamingLoader"]


@dataclass
class _Counts:
    """Samples seen and skipped (by reason) and taken per source, carried across a resume."""

    seen: int = 0
    bad: int = 0
    reasons: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)

    def add(self, other: _Counts) -> None:
        self.seen, self.bad = self.seen + other.seen, self.bad + other.bad
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        if other.sources:
            mine = self.sources or [0] * len(other.sources)
            self.sources = [a + b for a, b in zip(mine, other.sources, strict=True)]

    def as_dict(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "reasons": dict(self.reasons), "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict) -> _Counts:
        return cls(d["seen"], d["bad"], dict(d["reasons"]), list(d["sources"]))


class StreamingLoader:
    """A fixed number of batches per rank per epoch, from a ShardStream, with state_dict/load_state_dict."""

    def __init__(
        self,
        shards,
        *,
        map_fn: Callable[[dict], object],
        collate_fn: Callable[[list], object] = _as_list,
        batch_size: int,
        batches_per_epoch: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        allow_pipe: bool = False,
        max_bad_fraction: float = 0.01,
        min_samples_for_limit: int = 200,
        prefetch_factor: int = 2,
        length_fn: Callable[[object], int] | None = None,
        bucket_batches: int = 8,
        split: str = "shards",
        weights: list[float] | None = None,
    ):
        # long: the loader's options are validated together, before any worker starts
        """split: "shards" (each rank and worker reads its own shards: the normal case), "interleave" (every rank
        reads the global stream and keeps its share of each round, so N ranks x batch B/N see exactly the global
        batches of one process with batch B, and a run resumes on another world size: the module docstring), or
        "none" (every rank reads everything)."""
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if split not in ("shards", "interleave", "none"):
            raise ValueError(f"split must be shards, interleave or none, not {split!r}")
        self.rank, self.world_size, self.split = rank, world_size, split
        stream_rank, stream_world = (rank, world_size) if split == "shards" else (0, 1)
        # several sources (`weights` given: `shards` is a list of shard specs, one per weight), mixed sample by sample
        sources = [expand_urls(spec, allow_pipe=allow_pipe) for spec in shards] if weights is not None else None
        urls = sources[0] if sources else expand_urls(shards, allow_pipe=allow_pipe)
        if batches_per_epoch is None:
            if isinstance(shards, str) and shards.removeprefix("file:").endswith(".json"):
                total = sum(read_index(shards.removeprefix("file:"))[1])
                batches_per_epoch = max(1, total // (world_size * batch_size))
            else:
                raise ValueError("batches_per_epoch is required unless the shards come from an index JSON")
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.dataset = ShardStream(
            urls,
            map_fn=map_fn,
            collate_fn=collate_fn,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            rank=stream_rank,
            world_size=stream_world,
            num_workers=num_workers,
            allow_pipe=allow_pipe,
            max_bad_fraction=max_bad_fraction,
            min_samples_for_limit=min_samples_for_limit,
            length_fn=length_fn,
            bucket_batches=bucket_batches,
            sources=sources,
            weights=weights,
        )
        if split == "interleave":
            if length_fn is not None:
                raise ValueError("length bucketing (length_fn) sorts a rank's own samples: not with split=interleave")
            self.dataset.keep_rank, self.dataset.keep_world = rank, world_size
            self.dataset.global_stream = True
        self.global_stream = split == "interleave"
        self.stream_state: dict | None = None  # global stream: its state after the last consumed batch
        self.base = _Counts()  # global stream: counts carried over from the saved run (rank 0 holds them)
        self.tracker = BadSampleTracker(max_bad_fraction, min_samples_for_limit)
        self.epoch = 0
        self.in_epoch = 0
        self.consumed = 0
        self.worker_states: dict[int, dict] = {}
        self.data_wait_s = 0.0
        self._it = None

    def _iterator(self):
        if self._it is None:
            self.dataset.resume_states = dict(self.worker_states)
            self.dataset.rotation = self.consumed % max(self.num_workers, 1)
            kw = dict(num_workers=self.num_workers, batch_size=None, collate_fn=_as_list)
            if self.num_workers > 0:
                kw["prefetch_factor"] = self.prefetch_factor
            self._it = iter(DataLoader(self.dataset, **kw))
        return self._it

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        it = self._iterator()
        while self.in_epoch < self.batches_per_epoch:
            t0 = time.perf_counter()
            batch, meta = next(it)
            self.data_wait_s += time.perf_counter() - t0
            self.worker_states[meta["worker"]] = meta
            if self.global_stream:
                self.stream_state = meta["stream"]
            self.consumed += 1
            self.in_epoch += 1
            self._check_bad()
            yield batch
        self.epoch += 1
        self.in_epoch = 0

    def _check_bad(self) -> None:
        t = BadSampleTracker(self.tracker.max_bad_fraction, self.tracker.min_samples)
        t.merge(self.base.seen, self.base.bad, self.base.reasons)
        for st in self.worker_states.values():  # counts up to the batch just consumed (metrics, limit)
            t.merge(st["seen_now"], st["bad_now"], st["reasons_now"])
        t.examples = self.tracker.examples
        self.tracker = t
        t.check()

    def metrics(self) -> dict:
        out = {**self.tracker.metrics(), "data_wait_s": self.data_wait_s, "batches": self.consumed}
        if len(self.dataset.sources) > 1:  # samples each source gave this rank so far
            out["source_samples"] = self._counts().sources or [0] * len(self.dataset.sources)
        return out

    def state_dict(self) -> dict:
        if self.global_stream:
            return {
                "split": "interleave",
                "consumed": self.consumed,
                "num_workers": self.num_workers,
                "rank": self.rank,
                "world_size": self.world_size,
                "batch_size": self.dataset.batch_size,
                "stream": self.stream_state,
                "counts": self._counts().as_dict(),
            }
        return {
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "consumed": self.consumed,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": {str(k): v for k, v in self.worker_states.items()},
        }

    def _counts(self) -> _Counts:
        """This rank's sample counts so far (the carried base + every worker's)."""
        c = _Counts(self.base.seen, self.base.bad, dict(self.base.reasons), list(self.base.sources))
        for st in self.worker_states.values():
            c.add(_Counts(st["seen_now"], st["bad_now"], st["reasons_now"], st.get("sources_now", [])))
        return c

    def load_state_dicts(self, states: list[dict], source: str = "the saved run") -> None:
        """Resume from the states every rank of a saved run wrote (`states[r]`: rank r's). The global stream
        (`split="interleave"`) resumes on any world size, batch size and worker count whose rounds divide the
        samples already consumed; the per-rank split needs the saved world size. A mismatch is a ValueError naming
        what differs."""
        if not self.global_stream:
            if len(states) != self.world_size:
                raise ValueError(
                    f"{source} was saved by {len(states)} ranks with data.split={states[0].get('split', 'shards')} "
                    f"(each rank reads its own shards): resume it with {len(states)} ranks, or train with "
                    "data.split=interleave (the global stream) to resume on any number of ranks"
                )
            self.load_state_dict(states[self.rank])
            return
        if any(st.get("split") != "interleave" for st in states):
            raise ValueError(
                f"{source} was saved with data.split=shards (each rank reads its own shards), this run has "
                "data.split=interleave: resume with the saved split and world size"
            )
        streams = [json.dumps(st["stream"], sort_keys=True) for st in states]
        if len(set(streams)) != 1:
            raise ValueError(f"{source}: the ranks' saved stream cursors differ (a share of a round was all bad)")
        stream = states[0]["stream"]
        size = self.dataset.batch_size * self.world_size
        consumed = 0
        if stream is not None:
            done = stream["emitted"]
            if done % size:
                raise ValueError(
                    f"{source} stopped after {done} samples of the stream, not a whole number of this run's rounds "
                    f"(data.batch_size {self.dataset.batch_size} x {self.world_size} ranks = {size}): keep the "
                    "global batch (data.batch_size x ranks x optim.grad_accum) of the saved run"
                )
            _source_cursors(stream, len(self.dataset.sources))
            consumed = done // size
        total = _Counts()
        for st in states:
            total.add(_Counts.from_dict(st["counts"]))
        self.base = total if self.rank == 0 else _Counts()
        self.dataset.resume_global = stream
        self.epoch, self.in_epoch = divmod(consumed, self.batches_per_epoch)
        self.consumed = consumed
        self.worker_states, self.stream_state, self._it = {}, stream, None

    def load_state_dict(self, sd: dict) -> None:
        if self.global_stream or sd.get("split") == "interleave":
            if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
                raise ValueError(f"a global-stream state of rank {sd['rank']}/{sd['world_size']}: use load_state_dicts")
            self.load_state_dicts([sd] * self.world_size)
            return
        for key in ("num_workers", "world_size", "rank"):
            mine = self.num_workers if key == "num_workers" else getattr(self, key)
            if sd[key] != mine:
                raise ValueError(f"loader state was saved with {key}={sd[key]}, this loader has {key}={mine}")
        for st in sd["workers"].values():  # a run resumed with other data sources: a clear error now, not later
            _source_cursors(st, len(self.dataset.sources))
        self.epoch, self.in_epoch, self.consumed = sd["epoch"], sd["in_epoch"], sd["consumed"]
        self.worker_states = {int(k): v for k, v in sd["workers"].items()}
        self._it = None
