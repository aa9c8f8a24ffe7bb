"""The sample stream of the training loader (data/loader.py explains the order, the cursor and the global
stream): shards -> shuffle buffer -> decoded items -> batches, each with the cursor that regenerates it."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from mm_llama.rng import py_rng_state_from_list, py_rng_state_to_list

from .badsamples import BadSampleTracker, SampleError
from .shards import TruncatedShard, iter_samples, open_url


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
        # split="interleave": the global stream (module docstring); rank keep_rank of keep_world ranks
        self.keep_rank, self.keep_world = 0, 1
        self.global_stream = False
        self.resume_global: dict | None = None  # the global stream's state at a round boundary

    @property
    def readers(self) -> int:
        """How many disjoint shard readers the stream is split into (1: the global stream)."""
        return 1 if self.global_stream else self.world_size * self.num_workers

    # --- which samples a worker reads ---------------------------------------------------------
    def shard_plan(self, epoch: int, g: int, src: int = 0) -> tuple[list[str], int | None]:
        """(source `src`'s shards for global worker g in data-epoch `epoch`, sample modulus filter or None)."""
        G = self.readers
        order = list(self.sources[src])
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + epoch + 7_919_993 * src).shuffle(order)
        if len(order) >= G:
            return order[g::G], None
        return order, g

    def _raw_stream(self, g: int, src: int, epoch: int, pos: int, offset: int, tracker) -> Iterator[tuple]:
        """Yields ((src, epoch, pos, index), raw sample, cursor_after) forever, from one source."""
        G = self.readers
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
        if self.global_stream:
            yield from self._iter_global(physical)
            return
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
        if state is not None:
            rng.setstate(py_rng_state_from_list(state["rng"]))
            cursors, ids = _source_cursors(state, S)
            used = list(state.get("sources", used))
            fetched = self._fetch(g, ids)
            buffer = [(i, fetched[i]) for i in ids if i in fetched]
            tracker.merge(state["seen"], state["bad"], state["reasons"])
            skip = state["skip"]
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
            }
            if streams is None:
                streams = [self._raw_stream(g, k, *cursors[k], tracker) for k in range(S)]
            items = []
            want = self.batch_size * self.bucket_batches
            while len(items) < want:
                self._make(self._emit(rng, streams, cursors, buffer), tracker, used, items)
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

    def _emit(self, rng: random.Random, streams: list, cursors: list, buffer: list) -> dict:
        """The next raw sample out of the shuffle buffer (filled first): each sample drawn from a source chosen by
        the seeded `rng` (advancing that source's cursor in `cursors`), swapped with a random buffered one."""
        S = len(streams)
        while True:
            src = 0 if S == 1 else rng.choices(range(S), weights=self.weights)[0]
            sid, raw, cursors[src] = next(streams[src])
            if self.shuffle_buffer <= 1:
                return raw
            if len(buffer) < self.shuffle_buffer:
                buffer.append((sid, raw))
                continue
            j = rng.randrange(len(buffer))
            (_, out), buffer[j] = buffer[j], (sid, raw)
            return out

    def _make(self, raw: dict, tracker: BadSampleTracker, used: list[int], items: list) -> None:
        """`map_fn(raw)` appended to `items` and counted (per source in `used`); a bad sample counted and skipped."""
        try:
            items.append(self.map_fn(raw))
            tracker.ok()
            used[raw["__src__"]] += 1
        except SampleError as e:
            tracker.skip(e.reason, raw.get("__shard__", "?"), raw.get("__key__"), str(e))

    def _iter_global(self, physical: int):
        """The global stream's rounds (module docstring): worker `physical` decodes rounds physical, physical +
        num_workers, ... counted from the restored state, and hands each batch out with the stream's state at the
        end of its round."""
        tracker = BadSampleTracker(self.max_bad_fraction, self.min_samples_for_limit)
        rng = random.Random(self.seed * 7919)
        S = len(self.sources)
        cursors, buffer, emitted = [(0, 0, 0)] * S, [], 0
        state = self.resume_global
        if state is not None:
            rng.setstate(py_rng_state_from_list(state["rng"]))
            cursors, ids = _source_cursors(state, S)
            fetched = self._fetch(0, ids)
            buffer = [(i, fetched[i]) for i in ids if i in fetched]
            emitted = state["emitted"]
        used = [0] * S
        streams = [self._raw_stream(0, k, *cursors[k], tracker) for k in range(S)]
        W, rounds = self.keep_world, 0
        items: list = []
        while True:
            mine = rounds % self.num_workers == physical
            rounds += 1
            for i in range(self.batch_size * W):
                raw = self._emit(rng, streams, cursors, buffer)
                emitted += 1
                if mine and i % W == self.keep_rank:
                    self._make(raw, tracker, used, items)
            if not mine or not items:
                continue
            stream = {
                "cursor": [list(c) for c in cursors],
                "buffer": [list(i) for i, _ in buffer],
                "rng": py_rng_state_to_list(rng.getstate()),
                "emitted": emitted,
            }
            counts = {"seen_now": tracker.seen, "bad_now": tracker.bad, "reasons_now": dict(tracker.reasons)}
            batch, items = self.collate_fn(items), []
            yield batch, {"worker": physical, "stream": stream, **counts, "sources_now": list(used)}


def _source_cursors(state: dict, n_sources: int) -> tuple[list[tuple], list[tuple]]:
    """(per-source cursors, buffered sample ids) of a worker state; states saved before sources existed hold one
    cursor [epoch, pos, index] and 3-element ids (source 0)."""
    cursor = state["cursor"]
    cursors = [tuple(cursor)] if cursor and not isinstance(cursor[0], list) else [tuple(c) for c in cursor]
    if len(cursors) != n_sources:
        raise ValueError(f"loader state has {len(cursors)} data sources, this run has {n_sources}")
    ids = [tuple(i) if len(i) == 4 else (0, *i) for i in state["buffer"]]
    return cursors, ids
