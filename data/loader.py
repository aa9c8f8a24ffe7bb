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
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm_llama.rng import py_rng_state_from_list, py_rng_state_to_list

from .badsamples import BadSampleTracker, SampleError
from .shards import TruncatedShard, expand_urls, iter_samples, open_url, read_index


def _as_list(items):
    """The identity: the default collate keeps items as a list, and DataLoader's collate for already-batched
    items passes them on (its default_convert would walk every cursor field)."""
    return items


class ShardStream(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        *,
        map_fn: Callable[[dict], object],
        collate_fn: Callable[[list], object] = _as_list,
        batch_size: int,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        allow_pipe: bool = False,
        max_bad_fraction: float = 0.01,
        min_samples_for_limit: int = 200,
        length_fn: Callable[[object], int] | None = None,
        bucket_batches: int = 1,
        sources: list[list[str]] | None = None,
        weights: list[float] | None = None,
    ):
        """`sources` (instead of `urls`): several shard lists mixed sample by sample, source k drawn with
        probability weights[k] / sum(weights) by the worker's seeded RNG (deterministic, resumable); each raw sample
        carries its source index as `__src__`."""
        self.sources = [list(u) for u in sources] if sources else [list(urls)]
        if any(not u for u in self.sources):
            raise ValueError("no shards to read")
        self.weights = list(weights) if weights else [1.0] * len(self.sources)
        if len(self.weights) != len(self.sources) or min(self.weights) <= 0:
            raise ValueError(f"one positive weight per source, got {self.weights} for {len(self.sources)} sources")
        self.map_fn, self.collate_fn = map_fn, collate_fn
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.shuffle_shards, self.seed = shuffle_shards, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(num_workers, 1)
        self.allow_pipe = allow_pipe
        self.max_bad_fraction, self.min_samples_for_limit = max_bad_fraction, min_samples_for_limit
        self.length_fn = length_fn  # length-bucketed batching: sort `bucket_batches` batches' worth by length
        self.bucket_batches = bucket_batches if length_fn is not None else 1
        self.resume_states: dict[int, dict] = {}
        self.rotation = 0
        # split="interleave": every rank reads the same stream and keeps every world-th sample after shuffling
        self.keep_rank, self.keep_world = 0, 1

    # --- which samples a worker reads ---------------------------------------------------------
    def shard_plan(self, epoch: int, g: int, src: int = 0) -> tuple[list[str], int | None]:
        """(source `src`'s shards for global worker g in data-epoch `epoch`, sample modulus filter or None)."""
        G = self.world_size * self.num_workers
        order = list(self.sources[src])
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + epoch + 7_919_993 * src).shuffle(order)
        if len(order) >= G:
            return order[g::G], None
        return order, g

    def _raw_stream(self, g: int, src: int, epoch: int, pos: int, offset: int, tracker) -> Iterator[tuple]:
        """Yields ((src, epoch, pos, index), raw sample, cursor_after) forever, from one source."""
        G = self.world_size * self.num_workers
        while True:
            shards, modulo = self.shard_plan(epoch, g, src)
            while pos < len(shards):
                url = shards[pos]
                try:
                    stream = open_url(url, allow_pipe=self.allow_pipe)
                except (OSError, ValueError) as e:
                    tracker.skip("unreadable_shard", url, None, str(e))
                    pos, offset = pos + 1, 0
                    continue
                try:
                    for s in iter_samples(stream, url):
                        idx = s["__index__"]
                        if idx < offset:
                            continue
                        if modulo is not None and (pos + idx) % G != modulo:
                            continue
                        s["__sid__"], s["__src__"] = (epoch, pos, idx), src
                        yield (src, epoch, pos, idx), s, (epoch, pos, idx + 1)
                except TruncatedShard as e:
                    tracker.skip("truncated_tar", url, None, str(e) + " -- rest of shard skipped")
                finally:
                    try:
                        stream.close()
                    except OSError as e:
                        tracker.skip("unreadable_shard", url, None, str(e))
                pos, offset = pos + 1, 0
            epoch, pos, offset = epoch + 1, 0, 0

    def _fetch(self, g: int, ids: list[tuple]) -> dict[tuple, dict]:
        """Re-read the raw samples with the given (src, epoch, pos, index) ids (to restore a shuffle buffer)."""
        out: dict[tuple, dict] = {}
        by_shard: dict[tuple, set] = {}
        for src, e, p, i in ids:
            by_shard.setdefault((src, e, p), set()).add(i)
        for (src, e, p), wanted in by_shard.items():
            url = self.shard_plan(e, g, src)[0][p]
            stream = open_url(url, allow_pipe=self.allow_pipe)
            try:
                for s in iter_samples(stream, url):
                    if s["__index__"] in wanted:
                        s["__sid__"], s["__src__"] = (e, p, s["__index__"]), src
                        out[(src, e, p, s["__index__"])] = s
                        if len(out) == len(ids):
                            break
            finally:
                stream.close()
        return out

    # --- the worker loop ------------------------------------------------------------------------
    def __iter__(self):
        # long: the stream's resumable cursor is advanced in exactly one loop (data/loader.py docstring)
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.num_workers
        g = self.rank * self.num_workers + logical
        state = self.resume_states.get(logical)
        tracker = BadSampleTracker(self.max_bad_fraction, self.min_samples_for_limit)
        rng = random.Random(self.seed * 7919 + g)
        buffer: list[tuple] = []  # (id, raw sample)
        S = len(self.sources)
        cursors = [(0, 0, 0)] * S  # per source: (epoch, shard position, next index)
        used = [0] * S  # samples of each source this worker handed to map_fn successfully
        skip = 0
        emitted = 0  # samples out of the shuffle buffer so far (interleave split)
        if state is not None:
            rng.setstate(py_rng_state_from_list(state["rng"]))
            cursors, ids = _source_cursors(state, S)
            used = list(state.get("sources", used))
            fetched = self._fetch(g, ids)
            buffer = [(i, fetched[i]) for i in ids if i in fetched]
            tracker.merge(state["seen"], state["bad"], state["reasons"])
            skip = state["skip"]
            emitted = state.get("emitted", 0)
        streams = None
        while True:
            # snapshot at the start of a batch group: restoring it regenerates the same group
            snap = {
                "worker": logical,
                "cursor": [list(c) for c in cursors],
                "buffer": [list(i) for i, _ in buffer],
                "sources": list(used),
                "rng": py_rng_state_to_list(rng.getstate()),
                "seen": tracker.seen,
                "bad": tracker.bad,
                "reasons": dict(tracker.reasons),
                "emitted": emitted,
            }
            if streams is None:
                streams = [self._raw_stream(g, k, *cursors[k], tracker) for k in range(S)]
            items = []
            want = self.batch_size * self.bucket_batches
            while len(items) < want:
                src = 0 if S == 1 else rng.choices(range(S), weights=self.weights)[0]
                sid, raw, cursors[src] = next(streams[src])
                if self.shuffle_buffer > 1:
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append((sid, raw))
                        continue
                    j = rng.randrange(len(buffer))
                    (sid, raw), buffer[j] = buffer[j], (sid, raw)
                emitted += 1
                if (emitted - 1) % self.keep_world != self.keep_rank:
                    continue
                try:
                    items.append(self.map_fn(raw))
                    tracker.ok()
                    used[raw["__src__"]] += 1
                except SampleError as e:
                    tracker.skip(e.reason, raw.get("__shard__", "?"), raw.get("__key__"), str(e))
            if self.length_fn is not None:
                items.sort(key=self.length_fn)
            groups = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
            if self.length_fn is not None:
                rng.shuffle(groups)
            for j, group in enumerate(groups):
                if j < skip:
                    continue
                now = {"seen_now": tracker.seen, "bad_now": tracker.bad, "reasons_now": dict(tracker.reasons)}
                now["sources_now"] = list(used)
                yield self.collate_fn(group), {**snap, **now, "skip": j + 1}
            skip = 0


def _source_cursors(state: dict, n_sources: int) -> tuple[list[tuple], list[tuple]]:
    """(per-source cursors, buffered sample ids) of a worker state; states saved before sources existed hold one
    cursor [epoch, pos, index] and 3-element ids (source 0)."""
    cursor = state["cursor"]
    cursors = [tuple(cursor)] if cursor and not isinstance(cursor[0], list) else [tuple(c) for c in cursor]
    if len(cursors) != n_sources:
        raise ValueError(f"loader state has {len(cursors)} data sources, this run has {n_sources}")
    ids = [tuple(i) if len(i) == 4 else (0, *i) for i in state["buffer"]]
    return cursors, ids


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
        reads the same stream and keeps every world-th sample, so N ranks x batch B/N see exactly the global batches
        of one process with batch B; use 0 workers), or "none" (every rank reads everything)."""
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
            self.dataset.keep_rank, self.dataset.keep_world = rank, world_size
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
            self.consumed += 1
            self.in_epoch += 1
            self._check_bad()
            yield batch
        self.epoch += 1
        self.in_epoch = 0

    def _check_bad(self) -> None:
        t = BadSampleTracker(self.tracker.max_bad_fraction, self.tracker.min_samples)
        for st in self.worker_states.values():  # counts up to the batch just consumed (metrics, limit)
            t.merge(st["seen_now"], st["bad_now"], st["reasons_now"])
        t.examples = self.tracker.examples
        self.tracker = t
        t.check()

    def metrics(self) -> dict:
        out = {**self.tracker.metrics(), "data_wait_s": self.data_wait_s, "batches": self.consumed}
        if len(self.dataset.sources) > 1:  # samples each source gave this rank so far
            counts = [0] * len(self.dataset.sources)
            for st in self.worker_states.values():
                counts = [a + b for a, b in zip(counts, st["sources_now"], strict=True)]
            out["source_samples"] = counts
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "consumed": self.consumed,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": {str(k): v for k, v in self.worker_states.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        for key in ("num_workers", "world_size", "rank"):
            mine = self.num_workers if key == "num_workers" else getattr(self, key)
            if sd[key] != mine:
                raise ValueError(f"loader state was saved with {key}={sd[key]}, this loader has {key}={mine}")
        for st in sd["workers"].values():  # a run resumed with other data sources: a clear error now, not later
            _source_cursors(st, len(self.dataset.sources))
        self.epoch, self.in_epoch, self.consumed = sd["epoch"], sd["in_epoch"], sd["consumed"]
        self.worker_states = {int(k): v for k, v in sd["workers"].items()}
        self._it = None
